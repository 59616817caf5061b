"""RoTTA on the packaged digits ResNet and real digits: the memory bank's admission and eviction
rules, robust BatchNorm, and one update recomputed here by hand."""

import copy
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from dusa_cli.config.schema import ModelConfig, OptimConfig
from dusa_cli.data.datasets import open_split
from dusa_cli.engine.adapter import OnlineAdapter
from dusa_cli.methods import get_method
from dusa_cli.methods.cotta import augmented_view, soft_cross_entropy
from dusa_cli.methods.rotta import MemoryBank, RobustBatchNorm, Rotta
from dusa_cli.models.classifier import create_classifier

from helpers import assert_one_line_error, dusa

PRESET = str(Path(__file__).parents[1] / "configs" / "cls" / "digits.yaml")
CPU = torch.device("cpu")


def build(**options) -> Rotta:
    torch.manual_seed(0)
    classifier = create_classifier(ModelConfig(name="dusa_digits_resnet.sklearn_digits", pretrained=True))
    return Rotta(classifier, get_method("rotta").Config(name="rotta", **options)).place([CPU])


@pytest.fixture(scope="module")
def digits(digits_c: Path) -> torch.Tensor:
    """32 real noisy digits in [0, 1]."""
    images, _ = next(iter(DataLoader(open_split(digits_c, "gaussian_noise/5"), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))))
    return images.float() / 255


def banked(bank: MemoryBank) -> list[tuple[str, int]]:
    """(name, age) of every banked image, class by class; an image is a 1-element tensor of its name's code."""
    state = bank.state_dict()
    return [(chr(int(image)), age) for image, age in zip(state["image"], state["age"])]


def add(bank: MemoryBank, name: str, label: int, uncertainty: float) -> None:
    bank.add(torch.tensor([ord(name)]), label, uncertainty)


def test_memory_bank_keeps_a_class_to_its_share_and_evicts_its_oldest_least_certain_image() -> None:
    bank = MemoryBank(capacity=4, num_classes=2, lambda_t=1.0, lambda_u=1.0)  # 2 images per class
    add(bank, "a", 0, 0.5)
    add(bank, "b", 0, 0.1)
    assert banked(bank) == [("a", 2), ("b", 1)]  # every arrival ages the bank
    # Class 0 has its share. Scores σ(age / 4) + H / ln 2: a 1.344, b 0.707; the newcomer 0.933.
    add(bank, "c", 0, 0.3)
    assert banked(bank) == [("b", 2), ("c", 1)]
    # A newcomer scoring above every image of its class stays out, and the bank still ages.
    add(bank, "d", 0, 5.0)
    assert banked(bank) == [("b", 3), ("c", 2)]
    images, ages = bank.contents()
    assert images.flatten().tolist() == [ord("b"), ord("c")] and ages.tolist() == [0.75, 0.5]


def test_memory_bank_makes_room_for_a_minority_class_in_the_largest_classes() -> None:
    bank = MemoryBank(capacity=4, num_classes=3, lambda_t=1.0, lambda_u=1.0)  # 4/3 images per class
    for name, label, uncertainty in [("a", 0, 0.1), ("b", 0, 0.1), ("c", 1, 0.1), ("d", 1, 0.9)]:
        add(bank, name, label, uncertainty)
    # Full. Class 2 is below its share: the worst of classes 0 and 1 leaves, d (the least certain,
    # 0.562 + 0.9 / ln 3 = 1.381) rather than a (the oldest, 0.731 + 0.1 / ln 3 = 0.822).
    add(bank, "e", 2, 0.2)
    assert banked(bank) == [("a", 5), ("b", 4), ("c", 3), ("e", 1)]
    # Now class 0 alone is the largest: its oldest goes, though c is as certain and not in class 0.
    add(bank, "f", 2, 0.0)
    assert banked(bank) == [("b", 5), ("c", 4), ("e", 2), ("f", 1)]


def test_robust_batch_norm_mixes_the_batch_statistics_into_the_source_ones() -> None:
    torch.manual_seed(0)
    source = nn.BatchNorm2d(3).eval()
    source.running_mean.normal_()
    source.running_var.uniform_(0.5, 2)
    source.weight.data.normal_()
    source.bias.data.normal_()
    robust = RobustBatchNorm(source, momentum=0.05).eval()
    x = torch.randn(4, 3, 5, 5) * 3 + 1
    assert torch.allclose(robust(x), source(x), atol=1e-5)  # in prediction: the statistics it keeps
    mean = 0.95 * source.running_mean + 0.05 * x.mean(dim=(0, 2, 3))
    var = 0.95 * source.running_var + 0.05 * x.var(dim=(0, 2, 3), unbiased=False)
    output = robust.train()(x)
    expected = (x - mean.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + source.eps) * source.weight.view(1, 3, 1, 1) + source.bias.view(1, 3, 1, 1)
    assert torch.allclose(output, expected, atol=1e-5)
    assert torch.allclose(robust.running_mean, mean) and torch.allclose(robust.running_var, var)


def test_rotta_update_recomputed_by_hand(digits: torch.Tensor) -> None:
    method = build()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in method.model.modules())  # all robust now
    norms = [m for m in method.model.modules() if isinstance(m, RobustBatchNorm)]
    assert not any(m.training for m in norms)  # the kept statistics, until an update
    assert {id(p) for p in method.parameters()} == {id(p) for m in norms for p in (m.weight, m.bias)}
    student, teacher = copy.deepcopy(method.model), copy.deepcopy(method.teacher)
    adapter = OnlineAdapter(method, OptimConfig(name="sgd", lr=0.1, momentum=0.0), "fp32", CPU)
    torch.manual_seed(1)
    output = adapter.step(digits)

    assert torch.allclose(output.logits, teacher(digits), atol=1e-5)  # the teacher predicts, before the update
    labels = output.logits.argmax(dim=1)
    images, ages = method.bank.contents()
    # 32 arrivals in a bank of 64: all in unless a class passed its share of 6.4.
    assert len(images) == 32 - sum(max(0, int(count) - 7) for count in labels.bincount(minlength=10))
    rows = [int((digits == image).flatten(1).all(dim=1).nonzero()) for image in images]
    assert method.bank.state_dict()["label"] == labels[rows].tolist()

    for network in (student, teacher):  # robust BatchNorms take the bank's statistics
        for module in network.modules():
            if isinstance(module, RobustBatchNorm):
                module.train()
    torch.manual_seed(1)
    view = augmented_view(images)
    targets = teacher(images)
    predictions = student(view)
    timeliness = torch.exp(-ages) / (1 + torch.exp(-ages))
    loss = (soft_cross_entropy(predictions, targets) * timeliness).mean()
    assert output.loss.item() == pytest.approx(loss.item(), rel=1e-5)

    loss.backward()
    for (name, param), before in zip(method.model.named_parameters(), student.parameters()):
        expected = before - 0.1 * before.grad if before.grad is not None else before
        assert torch.allclose(param, expected, atol=1e-6), name
    for param, before, trained in zip(method.teacher.parameters(), teacher.parameters(), method.model.parameters()):
        assert torch.allclose(param, 0.999 * before + 0.001 * trained, atol=1e-6)
    for ours, theirs in [(method.model, student), (method.teacher, teacher)]:
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours.buffers(), theirs.buffers()))


def test_rotta_state_restores_the_bank_and_a_reset_empties_it(digits: torch.Tensor) -> None:
    method = build()
    adapter = OnlineAdapter(method, OptimConfig(lr=1e-3), "fp32", CPU)
    initial = copy.deepcopy(adapter.state_dict())
    adapter.step(digits)
    stream = io.BytesIO()
    torch.save(adapter.state_dict(), stream)
    images, ages = method.bank.contents()

    restored = build()
    OnlineAdapter(restored, OptimConfig(lr=1e-3), "fp32", CPU).load_state_dict(torch.load(io.BytesIO(stream.getvalue()), weights_only=False))
    restored_images, restored_ages = restored.bank.contents()
    assert torch.equal(restored_images, images) and torch.equal(restored_ages, ages)
    assert all(torch.equal(a, b) for a, b in zip(restored.teacher.buffers(), method.teacher.buffers()))

    adapter.load_state_dict(initial)
    assert len(method.bank) == 0
    assert all(torch.equal(a, b) for a, b in zip(method.model.buffers(), build().model.buffers()))


def test_rotta_runs_from_the_command_line_and_refuses_accumulation(digits_c: Path, tmp_path: Path) -> None:
    common = ("baseline", "-c", PRESET, "--data", str(digits_c), "--corruption", "gaussian_noise", "--method", "rotta", "-q")
    result = dusa(*common, "-o", str(tmp_path / "rotta"))
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "rotta" / "results.json").read_text())
    assert record["method"] == "rotta" and 0 <= record["tasks"][0]["top1"] <= 1
    refused = dusa(*common, "--set", "optim.accumulation=2", "-o", str(tmp_path / "accumulated"))
    assert_one_line_error(refused, 2, "method 'rotta' learns from whole batches, so it must be 1 (got 2)")
