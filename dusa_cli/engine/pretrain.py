"""Train the embedded benchmark's source classifier on the clean digits source split.

Plain supervised training (Adam, cosine schedule, ±2-px random shifts), then the clean test
accuracy is measured on the held-out clean split. The weights are saved as safetensors in
the layout `timm.create_model('dusa_digits_resnet')` loads.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dusa_cli.config.schema import ModelConfig
from dusa_cli.data.datasets import open_split
from dusa_cli.engine.runtime import seed_everything
from dusa_cli.errors import DusaError
from dusa_cli.models.classifier import create_classifier
from dusa_cli.results.io import write_atomic

SHIFT = 2


def _stack(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images).float().div_(255), torch.tensor(labels)


def _random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    padded = F.pad(images, (SHIFT,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2,), generator=generator).tolist()
    height, width = images.shape[-2:]
    return padded[..., dy : dy + height, dx : dx + width]


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(256)])
    return (predictions == labels).float().mean().item()


def train_digits_classifier(
    data: Path, output: Path, *, epochs: int = 30, seed: int = 0, batch_size: int = 64, lr: float = 2e-3, show_progress: bool = True
) -> float:
    """Returns the clean test accuracy of the trained model."""
    from dusa_cli.ui import FileProgress

    if output.suffix != ".safetensors":
        raise DusaError(f"weights file must end in .safetensors: {output}")
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = _stack(open_split(data, "train"))
    test_x, test_y = _stack(open_split(data, "clean"))
    model = create_classifier(ModelConfig(name="dusa_digits_resnet"))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    with FileProgress("train digits-classifier (epochs)", enabled=show_progress) as progress:
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(train_x), generator=generator)
            for batch in order.split(batch_size):
                loss = F.cross_entropy(model(_random_shift(train_x[batch], generator)), train_y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            progress(epoch + 1, epochs)
    accuracy = evaluate(model, test_x, test_y)
    from safetensors.torch import save

    weights = {k: v.contiguous() for k, v in model.backbone.state_dict().items()}
    write_atomic(output, lambda stream: stream.write(save(weights, metadata={"clean_test_accuracy": f"{accuracy:.4f}"})))
    return accuracy
