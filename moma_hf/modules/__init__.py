"""The small trainable and stateful pieces MoMA adds: projection heads, batch attention, the key queue, collectives."""
