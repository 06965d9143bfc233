"""Datasets: records, splits and readers for the formats users have."""

from difffeat.data.core import DataError, Dataset, Sample, Split, carve_val, load_image

__all__ = ["DataError", "Dataset", "Sample", "Split", "carve_val", "load_image"]
