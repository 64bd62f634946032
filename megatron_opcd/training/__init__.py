"""The OPCD training loop, its baselines, optimizer, checkpoints and logging."""
