"""Transforms described as MONAI bundle configuration (``{"_target_": "LoadImaged", ...}``).

Each trainer describes the pre-processing of its validation images this way and instantiates it with
MONAI's ``ConfigParser``; the fetched model's MONAI bundle (``configs/inference.json``) carries the same
description, so an imaging agent pre-processes an image exactly as validation did.
"""

from monai.bundle import ConfigParser


def instantiate(transforms: list[dict]) -> list:
    """The MONAI transform objects that ``transforms`` (bundle-config dicts) describe."""
    return ConfigParser({"transforms": transforms}).get_parsed_content("transforms")
