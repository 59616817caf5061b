"""CoTTA on a tiny real timm classifier and a tiny real SegFormer: teacher, anchor, restore."""

import dusa_cli._compat  # noqa: F401  (torchvision shim before timm)

import pydantic
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from dusa_cli.config.schema import OptimConfig
from dusa_cli.engine.adapter import OnlineAdapter
from dusa_cli.methods import available_methods, get_method
from dusa_cli.methods.cotta import Cotta, CottaConfig, augmented_view, soft_cross_entropy, to_image
from dusa_cli.models.segmenter import IMAGENET_MEAN, IMAGENET_STD, Segmenter

CPU = torch.device("cpu")


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=10, pretrained=False)


def segmenter(sr_ratios: tuple[int, ...] = (1, 1, 1, 1)) -> nn.Module:
    """SegFormer's spatial reduction off by default, so that every view of a small image is
    taken at its own scale (the released ratios, 8, 4, 2, 1, need 32-px inputs)."""
    torch.manual_seed(0)
    config = SegformerConfig(
        num_encoder_blocks=4,
        depths=[1, 1, 1, 1],
        sr_ratios=list(sr_ratios),
        hidden_sizes=[8, 16, 16, 16],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16,
        num_labels=5,
    )
    return Segmenter(SegformerForSemanticSegmentation(config), IMAGENET_MEAN, IMAGENET_STD)


def cotta(model: nn.Module, **options) -> Cotta:
    """CoTTA with its teacher moved off the student: as the student's copy (where the method
    starts) it would hide which of the two a computation used."""
    method = Cotta(model, CottaConfig(name="cotta", **options))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in method.teacher.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return method


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(module: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(state[k], v) for k, v in module.state_dict().items())


def images(batch: int = 8, height: int = 32, width: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def test_registry_finds_cotta_and_its_config_rejects_unknown_keys() -> None:
    assert "cotta" in available_methods() and get_method("cotta") is Cotta
    config = Cotta.Config(name="cotta")
    assert (config.ema, config.augmentations, config.flip) == (0.999, 32, True)
    assert config.scales == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert config.anchor_threshold is None and config.restore_prob is None
    with pytest.raises(pydantic.ValidationError):
        Cotta.Config(name="cotta", augmentation=4)
    with pytest.raises(pydantic.ValidationError):
        Cotta.Config(name="cotta", restore_prob=1.5)


def test_only_the_student_is_trained_and_every_network_is_moved() -> None:
    method = cotta(classifier())
    assert set(method.modules()) == {"model", "teacher", "anchor"}
    student = list(method.model.parameters())
    assert [id(p) for p in method.parameters()] == [id(p) for p in student]
    assert all(not p.requires_grad for name in ("teacher", "anchor") for p in method.modules()[name].parameters())


def test_task_and_batchnorm_follow_the_model() -> None:
    """Classification: BatchNorm on the test batch (the official CoTTA trains in train mode).
    Segmentation: the DUSA runner keeps every network in eval mode, BatchNorm on running statistics."""
    for model, task, defaults, batch_statistics in ((classifier(), "cls", (0.1, 0.001), True), (segmenter(), "seg", (0.69, 0.01), False)):
        method = cotta(model)
        assert method.task == task and (method.anchor_threshold(), method.restore_prob()) == defaults
        norms = [m for m in method.model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms and all(m.training == batch_statistics and (m.running_mean is None) == batch_statistics for m in norms)
    assert cotta(classifier(), restore_prob=0.2, anchor_threshold=0.5).restore_prob() == 0.2


def test_teacher_is_the_ema_of_the_stepped_student() -> None:
    method = cotta(classifier(), ema=0.99, restore_prob=0.0, anchor_threshold=0.0)
    teacher_before, student_before = snapshot(method.teacher), snapshot(method.model)
    adapter = OnlineAdapter(method, OptimConfig(name="sgd", lr=0.05), "fp32", CPU)
    adapter.step(images())
    student = dict(method.model.named_parameters())
    # The student learned the teacher's predictions, which differ from its own: a real step.
    assert max((p - student_before[name]).abs().max().item() for name, p in student.items()) > 1e-3
    for name, param in method.teacher.named_parameters():
        expected = 0.99 * teacher_before[name] + 0.01 * student[name]
        assert torch.allclose(param, expected, atol=1e-6, rtol=0)  # float rounding of values near 1


def test_restore_with_probability_one_returns_the_source_after_the_ema() -> None:
    method = cotta(classifier(), ema=0.0, restore_prob=1.0, anchor_threshold=0.0)
    source = snapshot(method.model)
    OnlineAdapter(method, OptimConfig(name="sgd", lr=0.05), "fp32", CPU).step(images())
    assert same(method.model, source)
    # ema 0: the teacher is the stepped student, taken before the restore.
    assert not same(method.teacher, source)


def test_restore_with_probability_zero_keeps_the_stepped_weights() -> None:
    method = cotta(classifier(), ema=0.0, restore_prob=0.0, anchor_threshold=0.0)
    source = snapshot(method.model)
    OnlineAdapter(method, OptimConfig(name="sgd", lr=0.05), "fp32", CPU).step(images())
    # ema 0: the teacher holds the stepped student, so the student must still equal it.
    assert same(method.model, snapshot(method.teacher)) and not same(method.model, source)


def test_partial_restore_is_elementwise_and_reproducible() -> None:
    def stepped() -> tuple[dict[str, torch.Tensor], ...]:
        # Augmented teacher views: a teacher equal to the student would give no gradient at all.
        method = cotta(classifier(), ema=0.0, restore_prob=0.5, anchor_threshold=1.01, augmentations=2)
        source = snapshot(method.model)
        torch.manual_seed(7)
        OnlineAdapter(method, OptimConfig(name="sgd", lr=0.05), "fp32", CPU).step(images())
        return source, snapshot(method.model), snapshot(method.teacher)

    source, student, teacher = stepped()
    assert all(torch.equal(student[k], v) for k, v in stepped()[1].items())
    for name in ("conv1.0.weight", "fc.weight"):
        moved = teacher[name] != source[name]  # ema 0: the teacher holds the stepped student
        reset = student[name][moved] == source[name][moved]
        kept = student[name][moved] == teacher[name][moved]
        assert moved.sum() > 100 and torch.all(reset | kept)
        assert 0.4 < reset.float().mean().item() < 0.6


def test_anchor_never_changes() -> None:
    method = cotta(classifier(), restore_prob=0.1, augmentations=2, anchor_threshold=1.01)
    anchor = snapshot(method.anchor)
    adapter = OnlineAdapter(method, OptimConfig(name="sgd", lr=0.05), "fp32", CPU)
    for _ in range(3):
        adapter.step(images())
    assert same(method.anchor, anchor)


def test_confident_anchor_keeps_the_plain_teacher_prediction() -> None:
    x = images()
    method = cotta(classifier(), anchor_threshold=0.0)
    output = method.forward(x)
    with torch.no_grad():
        assert torch.equal(output.logits, method.teacher(x)) and not torch.allclose(output.logits, method.model(x))
        assert torch.allclose(output.loss, soft_cross_entropy(method.model(x), output.logits).mean())


def test_unsure_anchor_averages_the_augmented_teacher_views() -> None:
    x = images()
    method = cotta(classifier(), anchor_threshold=1.01, augmentations=3)
    torch.manual_seed(3)
    output = method.forward(x)
    torch.manual_seed(3)  # the same draws: nothing before the views consumes the RNG
    with torch.no_grad():
        expected = torch.stack([method.teacher(augmented_view(x)) for _ in range(3)]).mean(0)
        assert torch.allclose(output.logits, expected, atol=1e-6)
        assert not torch.allclose(output.logits, method.teacher(x), atol=1e-3)


def test_augmented_views_stay_images_and_follow_the_seed() -> None:
    x = images(4, 24, 40)
    torch.manual_seed(5)
    first = augmented_view(x)
    second = augmented_view(x)
    torch.manual_seed(5)
    assert torch.equal(augmented_view(x), first)
    assert first.shape == x.shape and first.min() >= 0 and first.max() <= 1
    assert not torch.allclose(first, second) and not torch.allclose(first, x, atol=0.05)


def test_segmentation_mixes_plain_and_multi_scale_teacher_per_pixel() -> None:
    x = images(1, 32, 48)
    method = cotta(segmenter())
    with torch.no_grad():
        plain = to_image(method.teacher(x), x)
        averaged = method.multi_scale_logits(x, plain)
        anchor = to_image(method.anchor(x), x).softmax(1).amax(1, keepdim=True)
    threshold = anchor.median().item()
    confident = anchor > threshold  # the official runner keeps the plain view above the threshold
    assert confident.any() and not confident.all()
    for value, expected in ((0.0, plain), (1.01, averaged), (threshold, torch.where(confident, plain, averaged))):
        method.config.anchor_threshold = value
        output = method.forward(x)
        assert output.logits.shape == (1, 5, 32, 48)  # at the image's resolution
        assert torch.allclose(output.logits, expected, atol=1e-5)
        # Soft cross-entropy of the student's logits resized to the image against the mixture.
        assert torch.allclose(output.loss, soft_cross_entropy(to_image(method.model(x), x), expected).mean(), atol=1e-5)
    assert not torch.allclose(plain, averaged, atol=1e-4)


def test_views_too_small_for_the_segmenter_are_taken_at_its_smallest_scale() -> None:
    x = images(1, 32, 48)
    method = cotta(segmenter(sr_ratios=(8, 4, 2, 1)), scales=[0.5, 1.0], flip=False)
    assert method.teacher.min_side == 32
    with torch.no_grad():
        plain = to_image(method.teacher(x), x)
        # The half-scale view (16×24) would crash the spatial reduction; it is taken at 32×48.
        torch.testing.assert_close(method.multi_scale_logits(x, plain), plain)


def test_segmentation_views_are_resized_back_as_computed_by_hand() -> None:
    x = images(1, 32, 48)
    method = cotta(segmenter(), scales=[1.0, 1.5], flip=False)
    with torch.no_grad():
        plain = F.interpolate(method.teacher(x), size=(32, 48), mode="bilinear", align_corners=False)
        large = method.teacher(F.interpolate(x, size=(48, 72), mode="bilinear", align_corners=False))
        large = F.interpolate(large, size=(32, 48), mode="bilinear", align_corners=False)
        assert torch.allclose(method.multi_scale_logits(x, plain), (plain + large) / 2, atol=1e-6)


def test_segmentation_views_are_flipped_back() -> None:
    # Averaging each view with its flip, flipped back, is flip-equivariant; without the flip back it is not.
    x = images(1, 32, 48)
    method = cotta(segmenter())
    with torch.no_grad():
        logits = method.multi_scale_logits(x, to_image(method.teacher(x), x))
        mirrored = method.multi_scale_logits(x.flip(-1), to_image(method.teacher(x.flip(-1)), x))
    assert logits.shape == (1, 5, 32, 48)
    assert torch.allclose(logits, mirrored.flip(-1), atol=1e-5)


def test_segmentation_step_trains_the_student_then_the_teacher() -> None:
    method = cotta(segmenter(), restore_prob=0.0)
    student, teacher, anchor = snapshot(method.model), snapshot(method.teacher), snapshot(method.anchor)
    adapter = OnlineAdapter(method, OptimConfig(lr=1e-3), "fp32", CPU)
    output = adapter.step(images(1, 32, 48))
    assert output.logits.shape == (1, 5, 32, 48)
    assert not same(method.model, student) and not same(method.teacher, teacher)
    assert same(method.anchor, anchor)


def test_ema_and_restore_run_once_per_accumulated_step() -> None:
    method = cotta(classifier(), anchor_threshold=0.0)
    source, teacher = snapshot(method.model), snapshot(method.teacher)
    adapter = OnlineAdapter(method, OptimConfig(lr=1e-3, accumulation=2), "fp32", CPU)
    adapter.step(images())
    assert same(method.model, source) and same(method.teacher, teacher)
    adapter.step(images())
    assert not same(method.model, source) and not same(method.teacher, teacher)


def test_reset_through_the_state_restores_student_and_teacher() -> None:
    method = cotta(classifier(), anchor_threshold=0.0, restore_prob=0.01)
    adapter = OnlineAdapter(method, OptimConfig(lr=1e-3), "fp32", CPU)
    initial = torch.utils._pytree.tree_map(
        lambda v: v.clone() if isinstance(v, torch.Tensor) else v, adapter.state_dict()
    )
    assert set(initial["method"]) == {"model", "teacher"}
    student, teacher = snapshot(method.model), snapshot(method.teacher)
    torch.manual_seed(0)
    first = adapter.step(images()).logits
    adapter.step(images())
    adapter.load_state_dict(initial)
    assert same(method.model, student) and same(method.teacher, teacher)
    torch.manual_seed(0)
    assert torch.equal(adapter.step(images()).logits, first)
