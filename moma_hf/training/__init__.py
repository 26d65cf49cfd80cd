"""What keeps a run safe: the per-step guard, resumable checkpoints, output folders, launcher signals, token hygiene."""
