"""dusa: diffusion-guided test-time adaptation of image classifiers and segmenters."""

from dusa_cli._compat import TORCHVISION_STATUS  # noqa: F401  (must run before timm imports)

__version__ = "0.1.0"
