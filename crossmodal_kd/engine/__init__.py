"""The one training loop (Accelerate), checkpoints, metrics and run reports."""
