"""The pre-trained networks: teachers and students loaded or built by name, and their pooled features."""
