"""Import-time compatibility fixes that must run before timm/transformers/diffusers load.

On CPU-only machines `pip install timm` pulls the PyPI torchvision wheel, a CUDA build whose
native ops library cannot load. timm, transformers, diffusers and torchmetrics all import
torchvision when it is installed, and then fail on the missing `torchvision::nms` operator.
dusa uses none of torchvision's compiled ops, so declaring their schemas is enough
(docs/research/offline_assets.md §4). Where the native library loads, nothing is changed.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

_torchvision_stub: torch.library.Library | None = None


def ensure_torchvision_importable() -> str:
    """Make `import torchvision` safe; returns what was done (for the environment record)."""
    global _torchvision_stub
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return "not installed"
    libraries = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so"))
    try:
        if libraries:
            torch.ops.load_library(libraries[0])
            return "native ops"
    except (OSError, RuntimeError):
        pass
    if _torchvision_stub is None:
        _torchvision_stub = torch.library.Library("torchvision", "DEF")
        _torchvision_stub.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision_stub.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return "op schemas declared (compiled ops unavailable)"


TORCHVISION_STATUS = ensure_torchvision_importable()
