"""Train the embedded benchmark's source models on the clean digits source split.

- `train_digits_classifier`: the small ResNet the baselines and DUSA adapt (cross-entropy).
- `train_digits_prior`: the class-conditional pixel-space SiT that DUSA uses as its prior
  (flow matching on the linear path, labels dropped to the null class 10 % of the time so the
  null condition of DUSA-U is trained too).

Both use Adam with a cosine schedule and ±2-px random shifts, and write safetensors files in
the layout their factories load strictly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dusa_cli.config.schema import ModelConfig
from dusa_cli.data.datasets import open_split
from dusa_cli.engine.runtime import seed_everything
from dusa_cli.errors import ConfigError
from dusa_cli.models.classifier import create_classifier
from dusa_cli.writing import write_atomic

SHIFT = 2
LABEL_DROPOUT = 0.1  # SiT/DiT training convention (docs/research/peers.md §C)


def _stack(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images).float().div_(255), torch.tensor(labels)


def _random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    padded = F.pad(images, (SHIFT,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2,), generator=generator).tolist()
    height, width = images.shape[-2:]
    return padded[..., dy : dy + height, dx : dx + width]


def _save(module: nn.Module, output: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    weights = {k: v.contiguous() for k, v in module.state_dict().items()}
    write_atomic(output, lambda stream: stream.write(save(weights, metadata=metadata)))


def _fit(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    description: str,
    show_progress: bool,
) -> None:
    from dusa_cli.ui import FileProgress

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    with FileProgress(description, enabled=show_progress) as progress:
        for epoch in range(epochs):
            model.train()
            for batch in torch.randperm(len(images), generator=generator).split(batch_size):
                loss = loss_fn(_random_shift(images[batch], generator), labels[batch], generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            progress(epoch + 1, epochs)


Split = tuple[torch.Tensor, torch.Tensor]


def _start(data: Path, output: Path, seed: int) -> tuple[torch.Generator, Split, Split]:
    """Check the output name, seed everything, load the train and clean splits as tensors."""
    if output.suffix != ".safetensors":
        raise ConfigError(f"--output: a weights file must end in .safetensors: {output}")
    seed_everything(seed)
    return torch.Generator().manual_seed(seed), _stack(open_split(data, "train")), _stack(open_split(data, "clean"))


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(256)])
    return (predictions == labels).float().mean().item()


def train_digits_classifier(
    data: Path, output: Path, *, epochs: int = 30, seed: int = 0, batch_size: int = 64, lr: float = 2e-3, show_progress: bool = True
) -> float:
    """Returns the clean test accuracy of the trained model."""
    generator, (train_x, train_y), (test_x, test_y) = _start(data, output, seed)
    model = create_classifier(ModelConfig(name="dusa_digits_resnet"))
    _fit(
        model, lambda x, y, _: F.cross_entropy(model(x), y), train_x, train_y,
        epochs=epochs, batch_size=batch_size, lr=lr, generator=generator,
        description="train digits-classifier (epochs)", show_progress=show_progress,
    )
    accuracy = evaluate(model, test_x, test_y)
    _save(model.backbone, output, {"clean_test_accuracy": f"{accuracy:.4f}"})
    return accuracy


def train_digits_prior(
    data: Path, output: Path, *, epochs: int = 200, seed: int = 0, batch_size: int = 128, lr: float = 1e-3, show_progress: bool = True
) -> float:
    """Returns the flow-matching loss on the clean test split (fixed draws)."""
    from dusa_cli.priors.paths import LinearFlowPath
    from dusa_cli.priors.registry import create_prior_transformer

    generator, (train_x, train_y), (test_x, test_y) = _start(data, output, seed)
    model = create_prior_transformer("sit_digits")
    path = LinearFlowPath()
    null_class = model.config.num_classes

    def flow_loss(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, drop: float) -> torch.Tensor:
        x0 = images * 2 - 1  # pixel space in [-1, 1], as PixelSpace feeds the prior
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.rand(x0.shape[0], generator=gen)
        dropped = torch.rand(labels.shape, generator=gen) < drop
        labels = torch.where(dropped, torch.full_like(labels, null_class), labels)
        prediction = net(path.add_noise(x0, noise, t), path.model_time(t), labels)
        return F.mse_loss(prediction, path.target(x0, noise))

    _fit(
        model, lambda x, y, gen: flow_loss(model, x, y, gen, LABEL_DROPOUT), train_x, train_y,
        epochs=epochs, batch_size=batch_size, lr=lr, generator=generator,
        description="train digits-prior (epochs)", show_progress=show_progress,
    )
    with torch.no_grad():
        held_out = flow_loss(model.eval(), test_x, test_y, torch.Generator().manual_seed(seed), 0.0).item()
    _save(model, output, {"clean_test_flow_loss": f"{held_out:.4f}"})
    return held_out
