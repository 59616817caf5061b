"""Baselines on tiny real timm models: what each updates and how the adapter steps."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from dusa_cli.config.schema import MethodConfig, ModelConfig, OptimConfig
from dusa_cli.engine.adapter import OnlineAdapter
from dusa_cli.errors import ConfigError
from dusa_cli.methods import available_methods, get_method
from dusa_cli.methods.tent import softmax_entropy
from dusa_cli.models.classifier import create_classifier

from helpers import dusa


def make(method: str, model: str = "dusa_digits_resnet"):
    torch.manual_seed(0)
    classifier = create_classifier(ModelConfig(name=model))
    return get_method(method)(classifier, MethodConfig(name=method))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_baseline_help_names_every_built_in_method_without_a_prior() -> None:
    """`--help` answers without importing torch, so the names are written out in cli/run.py."""
    built_in = [m for m in available_methods() if get_method(m).__module__.startswith("dusa_cli.methods.")]
    baselines = [m for m in built_in if not get_method(m).uses_prior]
    assert {"source", "norm", "tent", "eata", "sar", "rotta", "cotta"} <= set(baselines)
    method_help = dusa("baseline", "--help").stdout.split("--method", 1)[1].split("--", 1)[0]
    assert set(re.findall(r"[a-z_]+", method_help)) >= set(baselines)


def test_an_unknown_timm_model_names_the_closest_ones() -> None:
    for typed, closest in (("resnet18x", "resnet18"), ("convnxt_large.fb_in1k", "convnext_large")):
        with pytest.raises(ConfigError, match=rf"unknown timm model '{typed}' \(similar: {closest},"):
            create_classifier(ModelConfig(name=typed))


def test_source_changes_nothing() -> None:
    method = make("source")
    before = snapshot(method.model)
    adapter = OnlineAdapter(method, OptimConfig(), "fp32", torch.device("cpu"))
    adapter.step(torch.rand(8, 3, 32, 32))
    assert adapter.optimizer is None
    assert all(torch.equal(before[k], v) for k, v in method.model.state_dict().items())


def test_norm_uses_test_batch_statistics() -> None:
    method = make("norm")
    images = torch.rand(8, 3, 32, 32)
    alone = method.forward(images[:1]).logits
    with_batch = method.forward(torch.cat([images[:1], images[1:] * 3]))
    assert not torch.allclose(alone, with_batch.logits[:1])  # batch statistics, not running ones
    assert with_batch.loss is None and not method.parameters()


@pytest.mark.parametrize("model", ["dusa_digits_resnet", "convnext_atto"])
def test_tent_updates_only_norm_affine_parameters(model: str) -> None:
    method = make("tent", model)
    names = {n for n, p in method.model.named_parameters() if p.requires_grad}
    norm_types = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
    expected = {
        f"{module_name}.{param}"
        for module_name, module in method.model.named_modules()
        if isinstance(module, norm_types)
        for param in ("weight", "bias")
        if getattr(module, param) is not None
    }
    assert names == expected and names
    before = snapshot(method.model)
    adapter = OnlineAdapter(method, OptimConfig(lr=1e-2), "fp32", torch.device("cpu"))
    adapter.step(torch.rand(8, 3, 32, 32))
    changed = {k for k, v in method.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and changed <= expected


def test_tent_loss_is_mean_entropy_and_drops_with_steps() -> None:
    method = make("tent")
    images = torch.rand(16, 3, 32, 32)
    output = method.forward(images)
    assert torch.allclose(output.loss, softmax_entropy(output.logits).mean(), atol=1e-6)
    adapter = OnlineAdapter(method, OptimConfig(lr=1e-2), "fp32", torch.device("cpu"))
    losses = [adapter.step(images).loss.item() for _ in range(5)]
    assert losses[-1] < losses[0]


def test_entropy_of_uniform_and_one_hot() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(softmax_entropy(logits), torch.tensor([torch.log(torch.tensor(4.0)), 0.0]), atol=1e-5)


def test_accumulation_steps_every_n_micro_batches_and_flushes_the_rest() -> None:
    method = make("tent")
    adapter = OnlineAdapter(method, OptimConfig(lr=1e-2, accumulation=3), "fp32", torch.device("cpu"))
    steps = []
    adapter.optimizer.register_step_post_hook(lambda *_: steps.append(1))
    for _ in range(7):
        adapter.step(torch.rand(4, 3, 32, 32))
    assert len(steps) == 2 and adapter.pending == 1
    adapter.flush()
    assert len(steps) == 3 and adapter.pending == 0
    assert all(p.grad is None for p in method.parameters())
    # A micro-batch with no image for this process (another process's shard) counts too, so
    # every process steps at the same micro-batch.
    adapter.step(torch.rand(4, 3, 32, 32))
    adapter.skip()
    adapter.skip()
    assert len(steps) == 4 and adapter.pending == 0


def test_an_accumulated_update_is_the_whole_batchs_and_follows_the_predictions() -> None:
    # Tent on a LayerNorm model (no batch statistics) with plain SGD (Adam would hide a wrong loss
    # scale): two micro-batches of 4 with accumulation 2 step as one batch of 8 does.
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    weights = {}
    for name, parts, accumulation in (("whole", [images], 1), ("split", list(images.split(4)), 2)):
        torch.manual_seed(0)
        method = get_method("tent")(create_classifier(ModelConfig(name="convnext_atto", num_classes=10)), MethodConfig(name="tent"))
        source = snapshot(method.model)
        with torch.no_grad():
            source_logits = method.model(images)
        adapter = OnlineAdapter(method, OptimConfig(name="sgd", lr=1.0, momentum=0.0, accumulation=accumulation), "fp32", torch.device("cpu"))
        logits = torch.cat([adapter.step(part).logits for part in parts])
        weights[name] = snapshot(method.model)
        assert torch.allclose(logits, source_logits, atol=1e-6)  # predicted before the update
        assert max((weights[name][k] - v).abs().max().item() for k, v in source.items()) > 1e-4  # and it stepped
    assert all(torch.allclose(weights["split"][k], v, atol=1e-6) for k, v in weights["whole"].items())


def test_adapter_state_round_trip_restores_model_and_optimizer() -> None:
    method = make("tent")
    adapter = OnlineAdapter(method, OptimConfig(lr=1e-2), "fp32", torch.device("cpu"))
    initial = {k: v for k, v in adapter.state_dict().items()}
    initial = torch.utils._pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, initial)
    images = torch.rand(8, 3, 32, 32)
    first = adapter.step(images).logits
    adapter.step(images)
    adapter.load_state_dict(initial)
    assert not adapter.optimizer.state
    assert torch.allclose(adapter.step(images).logits, first)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_run_on_cpu(precision: str) -> None:
    method = make("tent")
    adapter = OnlineAdapter(method, OptimConfig(lr=1e-3), precision, torch.device("cpu"))
    output = adapter.step(torch.rand(8, 3, 32, 32))
    assert torch.isfinite(output.loss)


def test_the_developer_guides_infomax_method_registers_and_runs(digits_c: Path, tmp_path: Path, monkeypatch) -> None:
    """docs/DEVELOPING.md's custom method, executed as written: one file is a working method."""
    from dusa_cli import methods
    from dusa_cli.config.loader import load_config
    from dusa_cli.engine.loop import run_experiment
    from dusa_cli.methods.base import norm_parameters

    guide = (Path(__file__).parents[1] / "docs" / "DEVELOPING.md").read_text()
    (example,) = [block for block in re.findall(r"```python\n(.*?)```", guide, re.S) if "@register_method" in block]
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))  # registered for this test only
    exec(compile(example, "DEVELOPING.md", "exec"), {"__name__": "infomax_example"})
    infomax = get_method("infomax")
    assert infomax.tasks == {"cls"}
    with pytest.raises(ValueError, match="method name 'infomax' is taken by infomax_example.InfoMax"):
        exec(compile(example, "DEVELOPING.md", "exec"), {"__name__": "another_file"})  # two files, one name

    torch.manual_seed(0)
    model = create_classifier(ModelConfig(name="convnext_atto", num_classes=10))
    method = infomax(model, infomax.Config(name="infomax", diversity=0.5))
    assert {id(p) for p in method.parameters()} == {id(p) for p in norm_parameters(model)}  # norm layers only
    images = torch.rand(4, 3, 32, 32)
    logits = model(images)
    mean = logits.softmax(dim=1).mean(dim=0)
    expected = softmax_entropy(logits).mean() + 0.5 * (mean * mean.log()).sum()  # entropy − 0.5 · H(mean)
    torch.testing.assert_close(method.forward(images).loss, expected)

    preset = Path(__file__).parents[1] / "configs" / "cls" / "digits.yaml"
    overrides = {"data.root": str(digits_c), "data.corruptions": ["fog"], "run.output": str(tmp_path / "run")}
    config = load_config(preset, overrides, ["method.name=infomax", "method.diversity=0.5"])
    results = run_experiment(config).results
    assert results["method"] == "infomax" and results["tasks"][0]["num_samples"] == 40
