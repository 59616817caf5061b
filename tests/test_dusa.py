"""DUSA and DUSA-U on tiny real models (timm classifier, in-house SiT/DiT, diffusers VAE):
where the gradients go, what is updated, determinism, and the CLI end to end."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_one_line_errors, dusa_each, randomized

from dusa_cli.config.loader import load_config
from dusa_cli.config.schema import ModelConfig
from dusa_cli.draws import Draws
from dusa_cli.errors import ConfigError
from dusa_cli.engine.adapter import OnlineAdapter
from dusa_cli.engine.loop import run_experiment
from dusa_cli.methods import get_method
from dusa_cli.methods.base import norm_parameters
from dusa_cli.models.classifier import create_classifier
from dusa_cli.objective import mix, prediction_loss, select_candidates

PRESET = Path(__file__).parents[1] / "configs" / "cls" / "dusa_digits.yaml"


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import AutoencoderKL

    from dusa_cli.priors.vae import TINY_VAE_CONFIG

    directory = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(directory)
    return directory


def make(method: str, prior: str, vae: Path, **options):
    """The method on a tiny classifier and a tiny random prior, perturbed: DiT's own init
    predicts 0 for every class, so the classifier would get no gradient at all."""
    torch.manual_seed(0)
    classifier = create_classifier(ModelConfig(name="convnext_atto", num_classes=10))
    config = get_method(method).Config(name=method, prior=prior, prior_random_init=True, vae=str(vae), **options)
    built = get_method(method)(classifier, config)
    randomized(built.prior.transformer)
    return built


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def manual_parts(method, images: torch.Tensor, seed: int):
    """The DUSA step recomputed by hand from the method's building blocks, same random draws."""
    torch.manual_seed(seed)
    logits = method.model(images)
    candidates = select_candidates(logits, topk=method.config.topk, extra=method.config.extra)
    latents = method.prior.encode(images)
    noise = Draws().normal(latents)
    t = method.timestep(latents.shape[0], latents.device)
    noisy = method.prior.path.add_noise(latents, noise, t)
    target = method.prior.path.target(latents, noise)
    return candidates, noisy, t, target


@pytest.mark.parametrize("prior", ["sit_tiny", "dit_tiny"])
def test_dusa_gradients_split_between_weights_and_predictions(prior: str, tiny_vae: Path) -> None:
    method = make("dusa", prior, tiny_vae)
    images = torch.rand(3, 3, 32, 32)
    torch.manual_seed(5)
    method.forward(images).loss.backward()
    classifier_grads, prior_grads = grads(method.model), grads(method.prior.transformer)
    assert any(grad.any() for grad in classifier_grads.values()) and any(grad.any() for grad in prior_grads.values())
    assert not any(n.startswith(("y_embedder", "pos_embed", "projectors")) for n in prior_grads)

    # The classifier's gradient is that of the loss with the predictions detached (it only
    # reaches the classifier through the weights) ...
    method.model.zero_grad(set_to_none=True)
    method.prior.zero_grad(set_to_none=True)
    candidates, noisy, t, target = manual_parts(method, images, seed=5)
    predictions = method.conditional_predictions(noisy, t, candidates.classes)
    prediction_loss(mix(predictions.detach(), candidates.weights), target, method.config.loss_weights).backward()
    for name, grad in classifier_grads.items():
        assert torch.allclose(method.model.get_parameter(name).grad, grad, atol=1e-6), name
    # ... and the prior's is that of the loss with the weights detached.
    prediction_loss(mix(predictions, candidates.weights.detach()), target, method.config.loss_weights).backward()
    for name, grad in prior_grads.items():
        assert torch.allclose(method.prior.transformer.get_parameter(name).grad, grad, atol=1e-6), name


def test_dusa_u_splits_the_two_losses(tiny_vae: Path) -> None:
    method = make("dusa_u", "sit_tiny", tiny_vae)
    images = torch.rand(2, 3, 32, 32)
    torch.manual_seed(3)
    method.forward(images).loss.backward()
    classifier_grads, prior_grads = grads(method.model), grads(method.prior.transformer)
    method.model.zero_grad(set_to_none=True)
    method.prior.zero_grad(set_to_none=True)

    candidates, noisy, t, target = manual_parts(method, images, seed=3)
    null = torch.full((2,), method.prior.null_class)
    F.mse_loss(method.prior.predict(noisy, t, method.prior.class_embeddings(null)), target).backward()
    assert not grads(method.model)  # the null-class loss never reaches the classifier
    for name, grad in prior_grads.items():
        assert torch.allclose(method.prior.transformer.get_parameter(name).grad, grad, atol=1e-6), name
    with torch.no_grad():
        predictions = method.conditional_predictions(noisy, t, candidates.classes)
    prediction_loss(mix(predictions, candidates.weights), target, method.config.loss_weights).backward()
    for name, grad in classifier_grads.items():
        assert torch.allclose(method.model.get_parameter(name).grad, grad, atol=1e-6), name


def test_what_is_updated_follows_the_switches(tiny_vae: Path) -> None:
    everything = make("dusa", "sit_tiny", tiny_vae)
    classifier = {id(p) for p in everything.model.parameters()}
    prior = {id(p) for p in everything.prior.trainable_parameters()}
    updated = {id(p) for p in everything.parameters()}
    assert updated == classifier | prior
    norm_only = make("dusa", "sit_tiny", tiny_vae, update_classifier="norm", update_prior=False)
    trainable = {id(p) for p in norm_only.model.parameters() if p.requires_grad}
    assert trainable and trainable == {id(p) for p in norm_parameters(norm_only.model)}
    assert not any(p.requires_grad for p in norm_only.prior.parameters())
    assert not any(p.requires_grad for p in everything.prior.encoder.parameters())  # the VAE is frozen


def test_same_draws_same_loss_and_no_label_dropout(tiny_vae: Path) -> None:
    method = make("dusa", "sit_tiny", tiny_vae)
    images = torch.rand(2, 3, 32, 32)
    losses = []
    for _ in range(2):
        torch.manual_seed(11)
        losses.append(method.forward(images).loss.item())
    assert losses[0] == losses[1]
    # Each (image, candidate) pair is conditioned on its own class, never the null one, even with
    # the transformer in train mode (where upstream DiT drops 10 % of the labels): 96 pairs.
    method.prior.transformer.train()
    noisy, t = torch.randn(16, 4, 8, 8), torch.full((16,), 0.5)
    classes = torch.randint(0, 10, (16, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        predictions = method.conditional_predictions(noisy, t, classes)
        null = method.prior.predict(noisy, t, method.prior.class_embeddings(torch.full((16,), method.prior.null_class)))
        for k in range(6):
            alone = method.prior.predict(noisy, t, method.prior.class_embeddings(classes[:, k]))
            assert torch.allclose(predictions[:, k], alone, atol=1e-6)
            assert (predictions[:, k] - null).flatten(1).abs().amax(1).min() > 1e-3  # no pair took the null class


def test_ddpm_timestep_and_range(tiny_vae: Path) -> None:
    dit = make("dusa", "dit_tiny", tiny_vae)
    assert dit.timestep(2, torch.device("cpu")).tolist() == [100, 100]  # the official t (§1.4)
    assert make("dusa", "dit_tiny", tiny_vae, timestep=250).timestep(2, torch.device("cpu")).tolist() == [250, 250]
    assert make("dusa", "sit_tiny", tiny_vae, timestep=0.6).timestep(2, torch.device("cpu")).tolist() == pytest.approx([0.6, 0.6])
    sit = make("dusa", "sit_tiny", tiny_vae, timestep_range=(0.2, 0.4))
    values = {sit.timestep(2, torch.device("cpu"))[0].item() for _ in range(20)}
    assert len(values) > 1 and all(0.2 <= v < 0.4 for v in values)


def test_a_timestep_off_the_priors_path_is_a_config_error(tiny_vae: Path) -> None:
    from dusa_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="linear flow time"):
        make("dusa", "sit_tiny", tiny_vae, timestep=100)  # the DDPM step on a flow prior
    with pytest.raises(ConfigError, match="ddpm timestep"):
        make("dusa", "dit_tiny", tiny_vae, timestep_range=(0.2, 0.4))
    # A range is checked at both ends: [100, 1000) is the last valid one, not [100, 1001).
    make("dusa", "dit_tiny", tiny_vae, timestep_range=(100, 1000))
    with pytest.raises(ConfigError, match="got 1000"):
        make("dusa", "dit_tiny", tiny_vae, timestep_range=(100, 1001))
    with pytest.raises(ConfigError, match="got 1.5"):
        make("dusa", "sit_tiny", tiny_vae, timestep_range=(0.1, 1.5))
    for empty in ((0.4, 0.2), (0.3, 0.3)):
        with pytest.raises(ValueError, match="lo < hi"):
            make("dusa", "sit_tiny", tiny_vae, timestep_range=empty)


def test_classifier_and_prior_must_share_their_label_set(tiny_vae: Path) -> None:
    torch.manual_seed(0)
    eleven = create_classifier(ModelConfig(name="convnext_atto", num_classes=11))
    config = get_method("dusa").Config(name="dusa", prior="dit_tiny", prior_random_init=True, vae=str(tiny_vae))
    with pytest.raises(ConfigError, match="predicts 11 classes but prior dit_tiny is conditioned on 10"):
        get_method("dusa")(eleven, config)
    with pytest.raises(ConfigError, match="topk \\+ extra = 11 candidates, more than the 10 classes"):
        make("dusa", "dit_tiny", tiny_vae, topk=4, extra=7)


def test_a_few_adaptation_steps_lower_the_loss(tiny_vae: Path) -> None:
    method = make("dusa", "sit_tiny", tiny_vae)
    adapter = OnlineAdapter(method, load_config(PRESET, {}).optim.model_copy(update={"lr": 1e-3}), "fp32", torch.device("cpu"))
    images = torch.rand(4, 3, 32, 32)
    classifier = {name: p.detach().clone() for name, p in method.model.named_parameters()}
    losses = []
    for _ in range(6):
        torch.manual_seed(0)
        losses.append(adapter.step(images).loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(p, classifier[name]) for name, p in method.model.named_parameters())  # through the weights


def test_adapt_cls_end_to_end_and_command_guards(digits_c: Path, tmp_path: Path) -> None:
    from dusa_cli.priors.registry import packaged_weights

    common = ("-c", str(PRESET), "--data", str(digits_c), "--corruption", "fog", "--num-ex", "16")
    # output folder: method and flags; "again" names the preset's packaged prior as a file
    runs = {"dusa": ("dusa",), "dusa_u": ("dusa_u",), "again": ("dusa", "--prior-checkpoint", str(packaged_weights("sit_digits")))}
    finished = dusa_each(*(
        ("adapt-cls", *common, "--method", *flags, "--set", "data.batch_size=8", "-o", str(tmp_path / folder), "-q")
        for folder, flags in runs.items()
    ))  # fmt: skip
    for (folder, (method, *_)), result in zip(runs.items(), finished):
        assert result.returncode == 0, result.stderr
        results = json.loads((tmp_path / folder / "results.json").read_text())
        assert results["method"] == method and results["tasks"][0]["num_samples"] == 16
        assert results["tasks"][0]["mean_loss"] > 0
    first, second = (json.loads((tmp_path / d / "results.json").read_text())["tasks"][0] for d in ("dusa", "again"))
    assert (first["top1"], first["mean_loss"]) == (second["top1"], second["mean_loss"])  # same seed and weights → same run
    assert "prior_pretrained: false" in (tmp_path / "again" / "config.yaml").read_text()  # the file given replaced them
    wrong = tmp_path / "wrong.pt"
    from dusa_cli.priors.registry import create_prior_transformer

    torch.save({"ema": create_prior_transformer("sit_tiny").state_dict()}, wrong)
    refused = [tmp_path / f"refused{index}" for index in range(6)]  # one each: the commands run side by side
    assert_one_line_errors(
        (("baseline", *common, "--method", "dusa", "-o", str(refused[0])), 2, "adapt-cls"),
        (("adapt-cls", *common, "--method", "tent", "-o", str(refused[1])), 2, "baseline"),
        (("baseline", *common, "--method", "tent", "--compile", "prior", "-o", str(refused[2])), 2, "method tent has no prior to compile"),
        (("adapt-cls", *common, "--prior", "sit_xl_2", "-o", str(refused[3])), 2, "ships no weights (packaged: sit_digits): pass --prior-checkpoint FILE"),
        (("adapt-cls", *common, "--prior-checkpoint", str(wrong), "-o", str(refused[4])), 1, "does not fit sit_digits"),
        (("adapt-cls", *common, "--set", "method.prior_pretrained=false", "-o", str(refused[5])), 2, "prior 'sit_digits' has no weights"),
    )
    assert not any(path.exists() for path in refused)


def test_micro_batch_layout_does_not_change_a_dusa_run(digits_c: Path, tmp_path: Path) -> None:
    """Per-image random streams: 16 images as 16 × 1 or as 8 × 2 accumulated draw the same noise
    and classes, so (on a LayerNorm classifier, no batch statistics) the runs agree."""
    preset = Path(__file__).parents[1] / "configs" / "cls" / "dusa_digits.yaml"
    runs = []
    for batch, accumulation in ((16, 1), (8, 2)):
        overrides = {
            "data.root": str(digits_c), "data.corruptions": ["fog"], "data.num_ex": 32,
            "data.batch_size": batch, "optim.accumulation": accumulation, "model.name": "convnext_atto",
            "model.num_classes": 10, "model.pretrained": False, "model.random_init": True, "run.output": str(tmp_path / f"{batch}x{accumulation}"),
        }  # fmt: skip
        runs.append(run_experiment(load_config(preset, overrides)).results["tasks"][0])
    one, two = runs
    assert one["num_samples"] == two["num_samples"] == 32
    assert one["top1"] == two["top1"]
    assert one["mean_loss"] == pytest.approx(two["mean_loss"], rel=1e-5)


def test_a_task_run_alone_draws_what_it_draws_inside_a_longer_run(digits_c: Path, tmp_path: Path) -> None:
    """Draws are keyed by the task's name, not its place in the list: fog alone and fog after
    another task (reset between them) see the same noise and extra classes, so the same run."""
    runs = {}
    for name, corruptions in (("alone", ["fog"]), ("second", ["gaussian_noise", "fog"])):
        overrides = {
            "data.root": str(digits_c), "data.corruptions": corruptions, "data.num_ex": 16, "data.batch_size": 8,
            "model.name": "convnext_atto", "model.num_classes": 10, "model.pretrained": False, "model.random_init": True,
            "run.output": str(tmp_path / name),
        }  # fmt: skip
        runs[name] = run_experiment(load_config(PRESET, overrides)).results["tasks"][-1]
    alone, second = runs["alone"], runs["second"]
    assert second["corruption"] == alone["corruption"] == "fog"
    assert (second["top1"], second["mean_loss"]) == (alone["top1"], alone["mean_loss"])


def test_compiled_and_channels_last_runs_compute_what_the_eager_run_does(digits_c: Path, tmp_path: Path) -> None:
    """run.compile and run.channels_last change how the step runs, not what it computes."""
    from torch._dynamo.utils import counters

    preset = Path(__file__).parents[1] / "configs" / "cls" / "dusa_digits.yaml"
    runs = []
    # reduce-overhead records CUDA graphs on a GPU; on a CPU it compiles the same kernels as the
    # default mode, and the engine still marks every micro-batch as a new graph iteration.
    compiled = {"run.compile": ["prior"], "run.compile_mode": "reduce-overhead"}
    for name, options in (("eager", {}), ("compiled", compiled), ("nhwc", {"run.channels_last": True})):
        overrides = {
            "data.root": str(digits_c), "data.corruptions": ["fog"], "data.num_ex": 16, "data.batch_size": 8,
            "model.name": "convnext_atto", "model.num_classes": 10, "model.pretrained": False, "model.random_init": True,
            "run.output": str(tmp_path / name),
        } | options  # fmt: skip
        counters.clear()
        runs.append(run_experiment(load_config(preset, overrides)).results["tasks"][0])
        assert (counters["stats"]["unique_graphs"] > 0) == (name == "compiled")  # compiled only when asked
    eager = runs[0]
    for other in runs[1:]:
        assert other["top1"] == eager["top1"]
        assert other["mean_loss"] == pytest.approx(eager["mean_loss"], rel=1e-4)


def test_channels_last_converts_every_network_and_compile_names_only_what_a_method_has(tiny_vae: Path) -> None:
    method = make("dusa", "dit_tiny", tiny_vae)
    method.use_channels_last()
    convolutions = [m.weight for net in method.modules().values() for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)
    tent = get_method("tent")(method.model, get_method("tent").Config(name="tent"))
    with pytest.raises(ConfigError, match="method tent has no prior to compile"):
        tent.compile(["prior"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation only exists with a GPU")
@pytest.mark.parametrize("prior", ["sit_tiny", "dit_tiny"])
def test_a_bf16_dusa_step_never_waits_for_the_gpu(prior: str, tiny_vae: Path) -> None:
    """Issue 6: no host synchronisation in the step (class sampling, timesteps, the DDPM table,
    per-image draws, the optimizer). torch raises on any synchronising call in "error" mode."""
    from dusa_cli.config.schema import OptimConfig
    from dusa_cli.draws import ImageDraws

    device = torch.device("cuda")
    method = make("dusa", prior, tiny_vae, classifier_fp32=False).to(device)
    adapter = OnlineAdapter(method, OptimConfig(name="adam", lr=1e-5, fused=True), "bf16", device)
    images = torch.rand(4, 3, 32, 32, device=device)
    adapter.step(images, draws=ImageDraws([0, 1, 2, 3], batch_key=0))  # first use: lazy library initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        adapter.step(images, draws=ImageDraws([4, 5, 6, 7], batch_key=4))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs exist on a GPU only")
def test_cuda_graph_steps_with_accumulation_match_the_default_compiled_steps(tiny_vae: Path) -> None:
    """run.compile_mode reduce-overhead replays recorded graphs: over micro-batches accumulated
    into updates, losses and weights follow the default compiled run."""
    from dusa_cli.config.schema import OptimConfig
    from dusa_cli.draws import ImageDraws

    device = torch.device("cuda")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    runs = []
    for mode in ("default", "reduce-overhead"):
        torch.manual_seed(0)
        method = make("dusa", "dit_tiny", tiny_vae, classifier_fp32=False).to(device)
        method.compile(["prior", "model"], mode)
        assert method.captures_cudagraphs == (mode == "reduce-overhead")
        adapter = OnlineAdapter(method, OptimConfig(name="adam", lr=1e-3, accumulation=2), "bf16", device)
        losses = [adapter.step(images, draws=ImageDraws(list(range(4 * i, 4 * i + 4)), batch_key=i)).loss.item() for i in range(6)]
        runs.append((losses, [p.detach().clone() for p in adapter.params]))
    (losses, weights), (graph_losses, graph_weights) = runs
    assert graph_losses == pytest.approx(losses, rel=1e-3)
    for a, b in zip(weights, graph_weights):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
