"""Experiments: the run config, the pipeline, metrics.json and report, the command line."""
