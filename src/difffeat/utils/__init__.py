"""Plumbing every layer may use: atomic writes, progress bars, devices and threads, torchrun."""
