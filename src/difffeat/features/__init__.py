"""Features from backbones: featurizers, the on-disk feature store and the jobs that fill it."""
