"""Datasets: records, splits and readers for the formats users have."""

from difffeat.data.cifar import load_cifar100
from difffeat.data.coco import load_coco
from difffeat.data.core import DataError, Dataset, Sample, Split, carve_val, load_image
from difffeat.data.manifest import load_manifest
from difffeat.data.nuswide import load_nuswide
from difffeat.data.registry import available_datasets, load_dataset, register_dataset
from difffeat.data.vg import load_vg500
from difffeat.data.voc import VOC_CLASSES, load_voc2007

__all__ = [
    "VOC_CLASSES",
    "DataError",
    "Dataset",
    "Sample",
    "Split",
    "available_datasets",
    "carve_val",
    "load_cifar100",
    "load_coco",
    "load_dataset",
    "load_image",
    "load_manifest",
    "load_nuswide",
    "load_vg500",
    "load_voc2007",
    "register_dataset",
]
