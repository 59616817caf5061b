"""Classifiers (timm) and segmenters (transformers' SegFormer), built from local weights only."""

import dusa_cli._compat  # noqa: F401  (torchvision shim before timm/transformers)
