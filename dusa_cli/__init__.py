"""dusa: diffusion-guided test-time adaptation of image classifiers and segmenters.

torch loads only when a command needs it (`dusa --help`, config errors and `dusa report` stay
fast); the packages that import timm, transformers, diffusers or torchmetrics import
`dusa_cli._compat` first.
"""

__version__ = "0.1.0"
