"""Data: the built-in digits benchmark, image-folder domains (Office-Home), transforms, the datamodule."""

from hdrq_lightning.data.datamodule import DomainDataModule, IndexedSubset
from hdrq_lightning.data.digits import (
    DIGITS_DOMAINS,
    DIGITS_NUM_CLASSES,
    DigitsDomain,
    digits_split_indices,
    render_digits_domain,
)
from hdrq_lightning.data.office_home import OFFICE_HOME_DOMAINS, OFFICE_HOME_NUM_CLASSES, ImageFolderDomain
from hdrq_lightning.data.transforms import build_transforms

__all__ = [
    "DIGITS_DOMAINS",
    "DIGITS_NUM_CLASSES",
    "OFFICE_HOME_DOMAINS",
    "OFFICE_HOME_NUM_CLASSES",
    "DigitsDomain",
    "DomainDataModule",
    "ImageFolderDomain",
    "IndexedSubset",
    "build_transforms",
    "digits_split_indices",
    "render_digits_domain",
]
