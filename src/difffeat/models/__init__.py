"""Backbones (one readable file per model family), their loaders, noise schedules and the VAE."""
