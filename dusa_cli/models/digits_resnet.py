"""The embedded benchmark's source classifier: a small timm ResNet for 32×32 digits.

Registered in timm's model registry like any timm family, with its pretrained config carried
along: the weights are a file inside this package (trained by `dusa pretrain
digits-classifier`), so `pretrained=True` never touches the network.
"""

from __future__ import annotations

from importlib import resources

from timm.models import register_model
from torch import nn
from timm.models._builder import build_model_with_cfg
from timm.models._registry import generate_default_cfgs
from timm.models.resnet import BasicBlock, ResNet

DIGITS_WEIGHTS = "digits_resnet.safetensors"


def digits_weights_path() -> str:
    return str(resources.files("dusa_cli") / "assets" / DIGITS_WEIGHTS)


default_cfgs = generate_default_cfgs(
    {
        "dusa_digits_resnet.sklearn_digits": {
            "file": digits_weights_path(),
            "num_classes": 10,
            "input_size": (3, 32, 32),
            "pool_size": (1, 1),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            "first_conv": "conv1",
            "classifier": "fc",
            "license": "bsd-3-clause (trained on scikit-learn's digits)",
        }
    }
)


@register_model
def dusa_digits_resnet(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-10 with BatchNorm, widths 16-128, a deep 3×3 stem and no stem max-pool.

    32-px inputs would be 1×1 after stage 3 with ImageNet's stride-32 stem; dropping the pool
    (it has no parameters) keeps 2×2 maps at the last stage.
    """
    args = dict(
        block=BasicBlock,
        layers=(1, 1, 1, 1),
        channels=(16, 32, 64, 128),
        stem_type="deep",
        stem_width=8,
        num_classes=10,
    )
    args.update(kwargs)
    model = build_model_with_cfg(ResNet, "dusa_digits_resnet", pretrained, **args)
    model.maxpool = nn.Identity()
    return model
