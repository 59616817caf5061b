"""CoTTA (Wang et al., CVPR'22): a student trained on the pseudo-labels of its EMA teacher,
whose prediction is averaged over augmented views when a frozen source anchor is unsure, and
a stochastic restore of source weights against forgetting (docs/research/peers.md §A.4,
docs/research/dusa_official.md §2 and §3.7).

Classification (official `imagenet/cotta.py`): the anchor's confidence is the batch mean of its
max softmax probability; below the threshold the teacher logits are averaged over random
augmented views. BatchNorm layers normalise with the test batch's statistics (the official
puts the model in train mode).
Segmentation (the DUSA repository's `segmentation/core/runner/cotta.py`): every network stays
in eval mode, BatchNorm on its running statistics. Teacher logits over scales × flips are
resized to the image and averaged; where the anchor's per-pixel confidence at the image's
resolution is above the threshold the plain view's logits are kept instead. Loss: soft
cross-entropy of the student's logits, resized to the image, against that mixture.
Both: the prediction scored is the teacher's, as the official code returns.

Differences from the official code:
- Classification: BatchNorm uses test-batch statistics (as in Tent) but every other layer
  stays in eval mode, so dropout and drop-path are off; the official sets the whole model to
  train mode.
- The classification augmentations are this file's own tensor stack (`augmented_view`), with
  the official ImageNet ranges, applied to the [0, 1] images the stack was designed for; in the
  DUSA repo it runs on mean/std-normalised inputs and clips their negative values away
  (docs/research/dusa_official.md §2). Edge padding + affine + centre crop is done as one affine
  resampling with border padding; hue is shifted by a rotation in YIQ space.
- Segmentation views are scaled relative to the test image; the official scales ratios of the
  dataset's image scale. A view below the segmenter's smallest input side (32 px for
  SegFormer) is taken at the smallest scale that fits, so small images do not crash the
  spatial-reduction convolutions.
- The restore mask comes from a generator seeded by one draw of the global RNG per step (the
  official draws the mask from the global RNG); rank 0 shares its seed so replicas restore
  alike. With several processes the anchor confidence is the mean over a process's shard.
As the official, only parameters named `weight` or `bias` are restored (not, e.g., ConvNeXt's
layer-scale `gamma` or ViT's position embedding).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dusa_cli.collectives import broadcast_from_main
from dusa_cli.config.schema import MethodConfig
from dusa_cli.methods import register_method
from dusa_cli.methods.base import StepOutput, TTAMethod, use_batch_statistics
from dusa_cli.models.segmenter import Segmenter

Task = Literal["cls", "seg"]
# Official values: ImageNet-C (imagenet/cotta.py) and segmentation (dusa_official.md §3.7).
DEFAULT_ANCHOR_THRESHOLD: dict[Task, float] = {"cls": 0.1, "seg": 0.69}
DEFAULT_RESTORE_PROB: dict[Task, float] = {"cls": 0.001, "seg": 0.01}
RESTORED_NAMES = ("weight", "bias")


class CottaConfig(MethodConfig):
    ema: float = Field(default=0.999, ge=0, le=1, description="teacher = ema·teacher + (1 − ema)·student")
    anchor_threshold: float | None = Field(
        default=None,
        description="anchor confidence that keeps the plain teacher prediction (cls: a batch mean at or above it; "
        "seg: a pixel's above it; otherwise the mean over augmented views); cls 0.1, seg 0.69",
    )
    restore_prob: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="chance of each weight element to be reset to the source (cls 0.001, seg 0.01)",
    )
    augmentations: int = Field(default=32, ge=1, description="augmented teacher views averaged (classification)")
    scales: list[float] = Field(
        default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75],
        min_length=1,
        description="image scales of the teacher views (segmentation)",
    )
    flip: bool = Field(default=True, description="add the horizontal flip of every scale (segmentation)")


def frozen_copy(model: nn.Module) -> nn.Module:
    copied = copy.deepcopy(model)
    copied.requires_grad_(False)
    return copied


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per sample (per pixel): the cross-entropy of the student to the teacher's softmax."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, ema: float) -> None:
    """teacher = ema·teacher + (1 − ema)·student, parameter by parameter (CoTTA, RoTTA)."""
    for teacher_param, student_param in zip(teacher.parameters(), student.parameters()):
        teacher_param.mul_(ema).add_(student_param, alpha=1 - ema)


def to_image(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Stride-4 segmentation logits resized (bilinear) to the image, where the official runner
    takes its masks and losses."""
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def grey(images: torch.Tensor) -> torch.Tensor:
    return (images * images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def shift_hue(images: torch.Tensor, turns: float) -> torch.Tensor:
    """Rotate the chroma plane of YIQ by `turns` of a full circle."""
    to_yiq = images.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    cos, sin = math.cos(2 * math.pi * turns), math.sin(2 * math.pi * turns)
    rotation = images.new_tensor([[1, 0, 0], [0, cos, -sin], [0, sin, cos]])
    transform = torch.linalg.inv(to_yiq) @ rotation @ to_yiq
    return torch.einsum("ij,bjhw->bihw", transform, images)


def adjust_contrast(images: torch.Tensor, factor: float) -> torch.Tensor:
    mean = grey(images).mean(dim=(2, 3), keepdim=True)
    return (images - mean) * factor + mean


def adjust_saturation(images: torch.Tensor, factor: float) -> torch.Tensor:
    return (images - grey(images)) * factor + grey(images)


def jitter_colours(images: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation, hue and gamma, in a random order (official ranges)."""
    brightness, contrast, saturation = uniform(0.6, 1.4), uniform(0.7, 1.3), uniform(0.5, 1.5)
    hue, gamma = uniform(-0.06, 0.06), uniform(0.7, 1.3)
    operations = [
        lambda x: x * brightness,
        lambda x: adjust_contrast(x, contrast),
        lambda x: adjust_saturation(x, saturation),
        lambda x: shift_hue(x, hue),
        lambda x: x**gamma,
    ]
    for index in torch.randperm(len(operations)).tolist():
        # Clamped after each: the next operation expects [0, 1] (and a negative base has no real power).
        images = operations[index](images).clamp(0, 1)
    return images


def random_affine(images: torch.Tensor) -> torch.Tensor:
    """Rotation ±15°, scale 0.9–1.1, shift up to 1/8 of the side; edges repeat outward."""
    height, width = images.shape[-2:]
    angle, scale = math.radians(uniform(-15, 15)), uniform(0.9, 1.1)
    # The official translates by 1/16 of the image padded to twice its size.
    shift_x, shift_y = 2 * uniform(-1 / 8, 1 / 8), 2 * uniform(-1 / 8, 1 / 8)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # A rotation in pixels, written in the [-1, 1] coordinates of a possibly non-square image.
    theta = images.new_tensor([[cos, -sin * height / width, shift_x], [sin * width / height, cos, shift_y]])
    grid = F.affine_grid(theta.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gaussian_blur(images: torch.Tensor, sigma: float, size: int = 5) -> torch.Tensor:
    offsets = torch.arange(size, device=images.device, dtype=images.dtype) - size // 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, [size // 2] * 4, mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def augmented_view(images: torch.Tensor) -> torch.Tensor:
    """One random view of images in [0, 1]; one draw of the parameters for the whole batch, as
    the official stack transforms a batch tensor at once. Only the noise is per pixel."""
    views = jitter_colours(images.float().clamp(0, 1))
    views = random_affine(views)
    views = gaussian_blur(views, sigma=uniform(0.001, 0.5))
    if torch.rand(()).item() < 0.5:
        views = views.flip(-1)
    return (views + 0.005 * torch.randn_like(views)).clamp(0, 1)


@register_method
class Cotta(TTAMethod):
    name = "cotta"
    Config = CottaConfig
    config: CottaConfig

    def __init__(self, model: nn.Module, config: CottaConfig):
        self.task: Task = "seg" if isinstance(model, Segmenter) else "cls"
        super().__init__(model, config)
        self.teacher = frozen_copy(self.model)
        self.anchor = frozen_copy(self.model)  # the source weights: never updated, restored from

    def configure_model(self) -> None:
        super().configure_model()
        if self.task == "cls":  # the segmentation runner keeps BatchNorm on its running statistics
            use_batch_statistics(self.model)
        self.model.requires_grad_(True)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "teacher": self.teacher, "anchor": self.anchor}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.teacher.load_state_dict(state["teacher"])

    def anchor_threshold(self) -> float:
        if self.config.anchor_threshold is not None:
            return self.config.anchor_threshold
        return DEFAULT_ANCHOR_THRESHOLD[self.task]

    def restore_prob(self) -> float:
        if self.config.restore_prob is not None:
            return self.config.restore_prob
        return DEFAULT_RESTORE_PROB[self.task]

    def forward(self, images: torch.Tensor) -> StepOutput:
        if self.task == "seg":  # masks and loss at the image's resolution, as the official runner
            student_logits, teacher = to_image(self.model(images).float(), images), self.teacher_segmentation
        else:
            student_logits, teacher = self.model(images).float(), self.teacher_classification
        with torch.no_grad():
            teacher_logits = teacher(images)
        return StepOutput(logits=teacher_logits, loss=soft_cross_entropy(student_logits, teacher_logits).mean())

    def teacher_classification(self, images: torch.Tensor) -> torch.Tensor:
        confidence = self.anchor(images).float().softmax(dim=1).amax(dim=1).mean()
        if confidence >= self.anchor_threshold():
            return self.teacher(images).float()
        views = [self.teacher(augmented_view(images)).float() for _ in range(self.config.augmentations)]
        return torch.stack(views).mean(dim=0)

    def teacher_segmentation(self, images: torch.Tensor) -> torch.Tensor:
        """Per-pixel teacher logits at the image's resolution: the plain view's where the anchor
        is confident, the mean over scales × flips elsewhere."""
        plain = to_image(self.teacher(images).float(), images)
        anchor_confidence = to_image(self.anchor(images).float(), images).softmax(dim=1).amax(dim=1, keepdim=True)
        confident = anchor_confidence > self.anchor_threshold()
        if confident.all():  # the views would be discarded everywhere
            return plain
        return torch.where(confident, plain, self.multi_scale_logits(images, plain))

    def multi_scale_logits(self, images: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
        """The teacher's logits averaged over the scaled and flipped views, each flipped back
        and resized to the image (`plain`: the unscaled, unflipped view's)."""
        height, width = images.shape[-2:]
        # A view smaller than the segmenter accepts is taken at the smallest scale it does accept.
        smallest_scale = self.teacher.min_side / min(height, width)
        total = torch.zeros_like(plain)
        views = 0
        for scale in self.config.scales:
            scale = max(scale, smallest_scale)
            size = (round(height * scale), round(width * scale))
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            for flip in (False, True) if self.config.flip else (False,):
                if size == (height, width) and not flip:
                    total += plain  # the plain view, already computed
                else:
                    logits = self.teacher(scaled.flip(-1) if flip else scaled).float()
                    total += to_image(logits.flip(-1) if flip else logits, images)
                views += 1
        return total / views

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA teacher update, then the stochastic restore of the student (official order)."""
        ema_update(self.teacher, self.model, self.config.ema)
        # Every replica must reset the same elements: rank 0's seed and probability for all.
        seed, probability = broadcast_from_main((int(torch.randint(2**62, ()).item()), self.restore_prob()))
        generator: torch.Generator | None = None
        sources = dict(self.anchor.named_parameters())
        for name, param in self.model.named_parameters():
            if name.rsplit(".", 1)[-1] not in RESTORED_NAMES or not param.requires_grad:
                continue
            if generator is None:  # on the parameters' device: no mask crosses to the GPU
                generator = torch.Generator(device=param.device).manual_seed(seed)
            reset = torch.rand(param.shape, generator=generator, device=param.device) < probability
            param.copy_(torch.where(reset, sources[name], param))
