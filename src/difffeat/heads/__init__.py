"""Trainable heads on frozen features: one training loop, linear probes, the fusion head."""
