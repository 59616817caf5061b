"""EATA and SAR on the packaged digits ResNet and real digits: their sample selection, EATA's
Fisher anchor, SAR's sharpness-aware step and recovery, each recomputed here by hand."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from dusa_cli.config.schema import ModelConfig, OptimConfig
from dusa_cli.data.datasets import fixed_subset, open_split
from dusa_cli.engine.adapter import OnlineAdapter
from dusa_cli.errors import DusaError
from dusa_cli.methods import get_method
from dusa_cli.methods.eata import Eata
from dusa_cli.methods.sar import Sar, in_module
from dusa_cli.methods.tent import softmax_entropy
from dusa_cli.models.classifier import create_classifier

from helpers import dusa_each

PRESET = str(Path(__file__).parents[1] / "configs" / "cls" / "digits.yaml")
CPU = torch.device("cpu")


def build(name: str, **options):
    torch.manual_seed(0)
    classifier = create_classifier(ModelConfig(name="dusa_digits_resnet.sklearn_digits", pretrained=True))
    method_class = get_method(name)
    return method_class(classifier, method_class.Config(name=name, **options)).place([CPU])


@pytest.fixture(scope="module")
def digits(digits_c: Path) -> torch.Tensor:
    """32 real noisy digits in [0, 1]: the source model is sure of some and unsure of others."""
    images, _ = next(iter(DataLoader(open_split(digits_c, "gaussian_noise/5"), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))))
    return images.float() / 255


def trained(method) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in method.model.named_parameters() if p.requires_grad}


def test_eata_loss_weights_the_reliable_non_redundant_samples(digits: torch.Tensor) -> None:
    method = build("eata")
    margin = 0.4 * math.log(10)
    output = method.forward(digits)
    entropy = softmax_entropy(output.logits)
    reliable = entropy < margin
    assert 0 < reliable.sum() < len(digits)  # both kinds in the batch
    chosen = entropy[reliable]
    assert output.loss.item() == pytest.approx((chosen * torch.exp(margin - chosen)).mean().item(), rel=1e-5)
    # Once a moving average exists, a prediction close to it is redundant and left out.
    probs = output.logits.softmax(dim=1)
    method.mean_probs = probs[reliable][0]
    kept = reliable & (F.cosine_similarity(method.mean_probs[None], probs, dim=1).abs() < 0.05)
    assert 0 < kept.sum() < reliable.sum()
    chosen = entropy[kept]
    assert method.forward(digits).loss.item() == pytest.approx((chosen * torch.exp(margin - chosen)).mean().item(), rel=1e-5)


def test_eata_average_of_kept_predictions_is_updated_after_each_step_and_reset(digits: torch.Tensor) -> None:
    method = build("eata", redundancy_margin=2.0)  # nothing is redundant: the average is every reliable prediction
    adapter = OnlineAdapter(method, OptimConfig(lr=1e-3), "fp32", CPU)
    initial = copy.deepcopy(adapter.state_dict())
    logits = adapter.step(digits).logits
    probs = logits.softmax(dim=1)[softmax_entropy(logits) < 0.4 * math.log(10)]
    assert torch.allclose(method.mean_probs, probs.mean(dim=0), atol=1e-6)
    second = adapter.step(digits[:16]).logits
    probs2 = second.softmax(dim=1)[softmax_entropy(second) < 0.4 * math.log(10)]
    assert torch.allclose(method.mean_probs, 0.9 * probs.mean(dim=0) + 0.1 * probs2.mean(dim=0), atol=1e-6)
    adapter.load_state_dict(initial)
    assert method.mean_probs is None


@pytest.mark.parametrize("name", ["eata", "sar"])
def test_a_batch_with_no_reliable_sample_changes_nothing(name: str, digits: torch.Tensor) -> None:
    method = build(name, entropy_margin=1e-6)
    before = trained(method)
    adapter = OnlineAdapter(method, OptimConfig(lr=1e-2), "fp32", CPU)
    assert adapter.step(digits).loss is None
    assert all(torch.equal(before[name], p) for name, p in trained(method).items())


def test_eata_fisher_is_the_mean_squared_gradient_of_the_models_own_labels(digits_c: Path, digits: torch.Tensor) -> None:
    method = build("eata", fisher_data=digits_c / "train", fisher_samples=20, fisher_batch_size=10, fisher_center_crop=False)
    reference = build("eata")
    params = dict(p for p in reference.model.named_parameters() if p[1].requires_grad)
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    subset = fixed_subset(open_split(digits_c, "train"), 20)
    images = torch.stack([image for image, _ in subset]).float() / 255
    for batch in images.split(10):
        logits = reference.model(batch)
        F.cross_entropy(logits, logits.argmax(dim=1)).backward()
        for name, p in params.items():
            expected[name] += p.grad.square() / 2
            p.grad = None
    assert method.fisher.keys() == expected.keys()
    assert all(torch.allclose(method.fisher[name], expected[name], rtol=1e-4, atol=1e-12) for name in expected)
    assert method.anchor_loss().item() == 0.0  # at the source weights
    bias = method.model.backbone.bn1.bias
    with torch.no_grad():
        bias.add_(0.1)
    assert method.anchor_loss().item() == pytest.approx(2000 * 0.01 * float(method.fisher["backbone.bn1.bias"].sum()), rel=1e-4)
    # The step's loss is ETA's at the same weights plus the anchor.
    eta = build("eata")
    with torch.no_grad():
        eta.model.backbone.bn1.bias.add_(0.1)
    anchored, plain = method.forward(digits).loss.item(), eta.forward(digits).loss.item()
    assert anchored == pytest.approx(plain + method.anchor_loss().item(), rel=1e-5) and anchored > plain * (1 + 1e-3)


def test_eata_fisher_images_of_different_sizes_are_named(tmp_path: Path) -> None:
    for index, size in enumerate((32, 40)):
        (tmp_path / "0").mkdir(exist_ok=True)
        Image.new("RGB", (size, size)).save(tmp_path / "0" / f"{index}.png")
    with pytest.raises(DusaError, match="differ in size; set method.fisher_center_crop: true"):
        build("eata", fisher_data=tmp_path, fisher_center_crop=False)
    assert build("eata", fisher_data=tmp_path).fisher  # resized and cropped to 224: one batch


def test_sar_adapts_the_norm_layers_below_the_top_stage() -> None:
    method = build("sar")
    adapted = {name for name, p in method.model.named_parameters() if p.requires_grad}
    tent = {name for name, p in build("tent").model.named_parameters() if p.requires_grad}
    assert adapted == {name for name in tent if ".layer4." not in name} and adapted != tent
    assert in_module("blocks.9.norm1", ["blocks.9"]) and not in_module("blocks.10.norm1", ["blocks.1"])
    assert not in_module("norm_pre", ["norm"])


def sharpness_aware_gradient(method, images: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], float]:
    """SAR's gradient by hand on a copy of the model: the gradient of the reliable samples' mean
    entropy, the ascent ρ along its unit direction, and there the gradient of the still reliable
    ones' mean entropy (returned with that loss)."""
    rho, margin = 0.05, 0.4 * math.log(10)
    model = copy.deepcopy(method.model)
    params = [p for p in model.parameters() if p.requires_grad]
    entropy = softmax_entropy(model(images))
    reliable = entropy < margin
    grads = torch.autograd.grad(entropy[reliable].mean(), params)
    norm = torch.stack([g.norm() for g in grads]).norm()
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(g * rho / (norm + 1e-12))
    entropy2 = softmax_entropy(model(images))[reliable]
    kept = entropy2 < margin
    return torch.autograd.grad(entropy2[kept].mean(), params), entropy2[kept].mean().item()


def test_sar_step_is_the_sharpness_aware_step_on_reliable_samples(digits: torch.Tensor) -> None:
    method = build("sar")
    lr = 0.5
    grads, loss = sharpness_aware_gradient(method, digits)  # then one SGD step
    expected = [p0.detach() - lr * g for p0, g in zip(method.parameters(), grads)]

    adapter = OnlineAdapter(method, OptimConfig(name="sgd", lr=lr, momentum=0.0), "fp32", CPU)
    output = adapter.step(digits)
    assert output.loss.item() == pytest.approx(loss, rel=1e-5)
    assert all(torch.allclose(p, e, atol=1e-6) for p, e in zip(method.parameters(), expected))
    assert method.loss_average == pytest.approx(output.loss.item())


def test_sar_accumulates_each_micro_batchs_sharpness_aware_gradient(digits: torch.Tensor) -> None:
    # Each micro-batch ascends from the same weights and its second gradient joins the update's.
    method = build("sar")
    lr = 0.5
    first, _ = sharpness_aware_gradient(method, digits[:16])
    second, _ = sharpness_aware_gradient(method, digits[16:])
    expected = [p0.detach() - lr * (a + b) / 2 for p0, a, b in zip(method.parameters(), first, second)]
    adapter = OnlineAdapter(method, OptimConfig(name="sgd", lr=lr, momentum=0.0, accumulation=2), "fp32", CPU)
    adapter.step(digits[:16])
    adapter.step(digits[16:])
    assert all(torch.allclose(p, e, atol=1e-6) for p, e in zip(method.parameters(), expected))


def test_sar_recovers_the_source_weights_and_optimizer_when_its_loss_collapses(digits: torch.Tensor) -> None:
    method = build("sar", reset_threshold=10.0)  # any loss counts as a collapse
    source = trained(method)
    adapter = OnlineAdapter(method, OptimConfig(lr=1e-2), "fp32", CPU)
    steps = []
    adapter.optimizer.register_step_post_hook(lambda *_: steps.append(trained(method)))
    adapter.step(digits)
    assert any(not torch.equal(source[name], p) for name, p in steps[0].items())  # it did step, then went back
    assert all(torch.equal(source[name], p) for name, p in trained(method).items())
    assert not adapter.optimizer.state and method.loss_average is None


def test_eata_and_sar_run_from_the_command_line(digits_c: Path, tmp_path: Path) -> None:
    common = ("baseline", "-c", PRESET, "--data", str(digits_c), "--corruption", "gaussian_noise", "-q")
    eata = ("--method", "eata", "--set", f"method.fisher_data={digits_c / 'train'}", "--set", "method.fisher_samples=64",
            "--set", "method.fisher_center_crop=false", "--set", "method.redundancy_margin=0.4")  # fmt: skip
    runs = {"eata": (*common, *eata), "sar": (*common, "--method", "sar"), "eta": (*common, "--method", "eata")}
    results = dict(zip(runs, dusa_each(*((*args, "-o", str(tmp_path / name)) for name, args in runs.items()))))
    # Without clean source images EATA has no anchor: the run says so before it starts.
    assert "warning: method eata without method.fisher_data is ETA" in results.pop("eta").stderr
    for name, result in results.items():
        assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
        record = json.loads((tmp_path / name / "results.json").read_text())
        assert record["method"] == name and [task["corruption"] for task in record["tasks"]] == ["gaussian_noise"]
        assert 0 <= record["tasks"][0]["top1"] <= 1
