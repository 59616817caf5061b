"""DUSA segmentation and the segmentation engine on tiny real models (transformers SegFormer,
diffusers SD3) and real image/label files: windows, class selection, the multi-window gradient,
model parallelism on `cpu,cpu`, the baselines, the CLI."""

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dusa_cli.config.schema import ModelConfig, OptimConfig
from dusa_cli.draws import ImageDraws
from dusa_cli.engine.adapter import OnlineAdapter
from dusa_cli.engine.segmentation import predict_labels, prepare_image, resized_size
from dusa_cli.errors import ConfigError, DusaError
from dusa_cli.methods import get_method
from dusa_cli.models.segmenter import create_segmenter
from dusa_cli.objective import Window, masked_mixture_loss, sample_window, select_pixel_classes, sliding_windows
from dusa_cli.results.seg_metrics import SegmentationScore
from tests.helpers import assert_one_line_errors, dusa, dusa_each, optimizer_steps
from tests.tiny_sd3 import write_tiny_sd3
from tests.tiny_segformer import write_tiny_segformer

SIZES = {"ADE_val_00000001": (40, 56), "ADE_val_00000002": (60, 40), "ADE_val_00000003": (36, 36)}
CORRUPTIONS = ("gaussian_noise", "fog")
# Short side 32: the tiny SD3's 32-px windows (4×4 latents), every 11 px along the long side.
SMALL = ["--set", "data.short_side=32", "--set", "optim.lr=1e-4"]
WINDOWS = ["--set", "method.window=32", "--set", "method.stride=11"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"sd3": write_tiny_sd3(root / "sd3"), "segformer": write_tiny_segformer(root / "segformer")}


@pytest.fixture(scope="module")
def ade_c(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed's layout: images/validation/<corruption>_5/*.jpg beside annotations/validation."""
    root = tmp_path_factory.mktemp("ade20k_c")
    rng = np.random.default_rng(0)
    labels = root / "annotations" / "validation"
    labels.mkdir(parents=True)
    for stem, (height, width) in SIZES.items():
        Image.fromarray(rng.integers(0, 151, (height, width), dtype=np.uint8)).save(labels / f"{stem}.png")
    for corruption in CORRUPTIONS:
        folder = root / "images" / "validation" / f"{corruption}_5"
        folder.mkdir(parents=True)
        for stem, (height, width) in SIZES.items():
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{stem}.jpg")
    return root


def seg_args(models: dict[str, Path], ade_c: Path, output: Path, *more: str) -> list[str]:
    return [
        "--model", "segformer", "--checkpoint", str(models["segformer"]), "--data", str(ade_c),
        "--output", str(output), "--quiet", *SMALL, *more,
    ]  # fmt: skip


def dusa_method(models: dict[str, Path], cache: Path, **options) -> "torch.nn.Module":
    segmenter = create_segmenter(ModelConfig(name="segformer", checkpoint=models["segformer"]))
    cls = get_method("dusa_seg")
    config = cls.Config(name="dusa_seg", prior=models["sd3"], window=32, stride=11, prompt_cache=cache, **options)
    return cls(segmenter, config)


# ---- geometry and the objective, by hand ----


@pytest.mark.parametrize(("width", "count"), [(512, 1), (683, 2), (768, 3), (2048, 10)])
def test_window_counts_follow_the_official_slide(width: int, count: int) -> None:
    windows = sliding_windows(512, width, 512, 171)
    assert len(windows) == count  # dusa_official.md §3.2: 683 → 2, 768 → 3, 2048 → 10
    assert windows[0].left == 0 and windows[-1].left == width - 512  # the last flush right
    assert all(w.top == 0 for w in windows)


def test_portrait_images_slide_along_their_long_side() -> None:
    windows = sliding_windows(683, 512, 512, 171)
    assert [(w.top, w.left) for w in windows] == [(0, 0), (171, 0)]  # not just the top square


def test_a_short_side_just_over_the_window_still_gets_one_row() -> None:
    # 400 × 1800 resized to at most 2048 long: 455 × 2048, windows rounded to 448 (SD3's multiple).
    windows = sliding_windows(455, 2048, 448, 171)
    assert {w.top for w in windows} == {0} and len(windows) == 11
    assert windows[-1].left == 2048 - 448
    with pytest.raises(ValueError, match="window 32 is larger than the image's short side 20"):
        sliding_windows(20, 40, 32, 11)  # the long side would hold it: the short one decides


def test_logits_are_read_at_each_latent_pixels_own_place() -> None:
    # Stride-4 "logits" whose value is the x (channel 0) and y (channel 1) image coordinate of
    # each logits pixel's centre; bilinear reading of a linear map is exact inside the image.
    height, width = 64, 96
    ys = torch.arange(height // 4) * 4 + 2.0
    xs = torch.arange(width // 4) * 4 + 2.0
    coordinates = torch.stack([xs.expand(height // 4, -1), ys[:, None].expand(-1, width // 4)])
    window = Window(top=16, left=40, size=32)
    sampled = sample_window(coordinates, (height, width), window, grid=4)
    centres = torch.arange(4) * 8 + 4.0  # 8-px latent pixels, centred
    assert torch.allclose(sampled[0], (window.left + centres).expand(4, -1))
    assert torch.allclose(sampled[1], (window.top + centres)[:, None].expand(-1, 4))


def test_class_selection_keeps_the_union_under_the_cap() -> None:
    scores = torch.randn(30, 3, 3, generator=torch.Generator().manual_seed(0))
    union = scores.topk(2, dim=0).indices.unique()
    selected = select_pixel_classes(scores, topk=2, cap=30)
    assert selected.classes.tolist() == union.tolist() and selected.mask.all()
    manual = scores[union].softmax(dim=0)
    assert torch.allclose(selected.weights, manual)
    hotter = select_pixel_classes(scores, topk=2, cap=30, temperature=2.0)  # the scores divided by T
    assert torch.allclose(hotter.weights, (scores[union] / 2).softmax(dim=0))


def test_over_the_cap_every_top1_class_stays_and_the_rest_fills_up() -> None:
    torch.manual_seed(0)
    scores = torch.randn(40, 4, 4)
    top1 = scores.argmax(dim=0).unique()
    cap = top1.numel() + 2
    selected = select_pixel_classes(scores, topk=5, cap=cap)
    assert selected.classes.numel() == cap
    assert set(top1.tolist()) <= set(selected.classes.tolist())
    assert set(selected.classes.tolist()) <= set(scores.topk(5, dim=0).indices.unique().tolist())
    assert selected.mask.all()


def test_too_many_top1_classes_mask_the_pixels_of_the_dropped_ones() -> None:
    torch.manual_seed(1)
    scores = torch.randn(40, 5, 5)
    top1 = scores.argmax(dim=0)
    selected = select_pixel_classes(scores, topk=5, cap=3)
    assert selected.classes.numel() == 3
    assert set(selected.classes.tolist()) <= set(top1.unique().tolist())
    assert torch.equal(selected.mask, torch.isin(top1, selected.classes))
    assert 0 < selected.mask.sum() < 25
    assert torch.allclose(selected.weights.sum(dim=0), torch.ones(5, 5))
    # In a run the choice comes from the image's own stream, not from torch's global one.
    chosen = [select_pixel_classes(scores, topk=5, cap=3, draws=ImageDraws([key], batch_key=key)).classes for key in (7, 7, 8, 9)]
    torch.manual_seed(123)
    assert torch.equal(chosen[0], chosen[1]) and not all(torch.equal(chosen[0], other) for other in chosen[2:])


def test_masked_mixture_loss_by_hand() -> None:
    predictions = torch.stack([torch.ones(2, 2, 2), torch.zeros(2, 2, 2)])  # (K=2, C=2, 2, 2)
    weights = torch.stack([torch.full((2, 2), 0.25), torch.full((2, 2), 0.75)])
    mask = torch.tensor([[True, False], [True, True]])
    target = torch.ones(2, 2, 2)
    # kept pixels: (0.25 − 1)² each; the masked one is 0 in both and still counts in the mean.
    expected = 6 * 0.75**2 / 8
    assert masked_mixture_loss(predictions, weights, mask, target).item() == pytest.approx(expected)


def test_images_are_resized_as_mmseg_and_predictions_scored_at_full_size() -> None:
    assert resized_size(512, 683, 512, 2048) == (512, 683)
    assert resized_size(375, 500, 512, 2048) == (512, 683)
    assert resized_size(100, 1000, 512, 2048) == (205, 2048)  # the long side caps the scale
    image = torch.randint(0, 256, (1, 3, 40, 56), dtype=torch.uint8)
    from dusa_cli.config.schema import SegDataConfig

    prepared = prepare_image(image, SegDataConfig(root=Path("."), short_side=32))
    assert prepared.shape == (1, 3, 32, 45) and 0 <= prepared.min() and prepared.max() <= 1
    logits = torch.randn(1, 5, 8, 12, generator=torch.Generator().manual_seed(0))
    bilinear = F.interpolate(logits, size=(40, 56), mode="bilinear", align_corners=False).argmax(dim=1)
    assert torch.equal(predict_labels(logits, (40, 56)), bilinear)  # the class of the upsampled logits
    with pytest.raises(DusaError, match="40×56 image resized to 16×22 is below the segmenter's smallest input side, 32 px"):
        prepare_image(image, SegDataConfig(root=Path("."), short_side=16), min_side=32)


# ---- the method ----


def test_window_gradients_sum_to_the_gradient_of_the_whole_loss(models: dict[str, Path], tmp_path: Path) -> None:
    """Windows back-propagated one by one (through the logits leaf) give exactly the gradient of
    the summed loss built in one graph, for the segmenter and the prior."""
    method = dusa_method(models, tmp_path).place([torch.device("cpu")])
    adapter = OnlineAdapter(method, OptimConfig(name="adamw", lr=1e-4), "fp32", torch.device("cpu"))
    images = torch.rand(1, 3, 32, 56)
    torch.manual_seed(3)
    output = method.forward(images)
    assert output.backpropagated
    parts = {name: p.grad.clone() for name, p in method.model.named_parameters() if p.grad is not None}
    prior_parts = {n: p.grad.clone() for n, p in method.prior.transformer.named_parameters() if p.grad is not None}
    adapter.optimizer.zero_grad(set_to_none=True)

    torch.manual_seed(3)
    logits = method.segment(images)
    windows = sliding_windows(32, 56, 32, 11)
    assert len(windows) == 4
    whole = sum(method.window_loss(images, logits[0], window) for window in windows) / len(windows)
    whole.backward()
    assert output.loss.item() == pytest.approx(whole.item(), rel=1e-5)
    assert parts and prior_parts
    for name, param in method.model.named_parameters():
        assert torch.allclose(parts[name], param.grad, rtol=1e-4, atol=1e-9), name
    for name, param in method.prior.transformer.named_parameters():
        assert torch.allclose(prior_parts[name], param.grad, rtol=1e-4, atol=1e-9), name


def test_a_windows_loss_by_hand(models: dict[str, Path], tmp_path: Path) -> None:
    """One window's DUSA loss from its parts (§3.3-§3.5): the window's crop encoded, the
    L2-normalised logits read at its latent pixels, one noise at σ = 0.25 for every class, each
    class's velocity against the target ε − x0 (the gradient test above would not see a wrong
    crop, normalisation or target: it rebuilds the loss with `window_loss` itself)."""
    method = dusa_method(models, tmp_path).place([torch.device("cpu")])
    images, window = torch.rand(1, 3, 32, 56), Window(top=0, left=24, size=32)  # the last window, not at the origin
    with torch.no_grad():
        logits = method.segment(images)[0]
        torch.manual_seed(3)
        got = method.window_loss(images, logits, window)
        torch.manual_seed(3)
        latents = method.prior.encode(images[..., :, 24:56])
        scores = sample_window(F.normalize(logits, dim=0), (32, 56), window, latents.shape[-1])
        candidates = select_pixel_classes(scores, topk=5, cap=20)
        noise = torch.randn(latents.shape)
        count = candidates.classes.numel()
        noisy = (0.75 * latents + 0.25 * noise).expand(count, -1, -1, -1)
        predictions = method.prior.predict(noisy, torch.full((count,), 0.25), candidates.classes)
        expected = masked_mixture_loss(predictions, candidates.weights, candidates.mask, (noise - latents)[0])
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_split_prior_compiled_block_by_block_computes_what_the_eager_one_does(models: dict[str, Path], tmp_path: Path) -> None:
    """`--compile prior` over two devices: every transformer block and the VAE encoder compiled
    on its own side of the split give the eager step's loss and gradients (segmenter and prior).
    The backend is Inductor's front half (Dynamo's capture at block boundaries and across the
    devices, Inductor's decompositions, AOTAutograd's joint graph and its partition into forward
    and backward) without its code generation, whose kernels are PyTorch's to test and differ
    between a CPU (C++) and a GPU (Triton) anyway; it compiles in seconds, not a minute. A whole
    adapt-seg run is no check of this: its top-k class choices turn rounding differences into
    other classes a few updates later."""
    from dusa_cli.bench.timing import compiled_graphs

    images = torch.rand(1, 3, 32, 56)
    steps = []
    for compiled in (False, True):
        method = dusa_method(models, tmp_path).place([torch.device("cpu", 0), torch.device("cpu", 1)])
        assert len(set(method.prior.block_devices)) == 2
        before = compiled_graphs()
        if compiled:
            for network in method.compilable()["prior"]:
                network.compile(backend="aot_eager_decomp_partition")
        torch.manual_seed(3)
        loss = method.forward(images).loss.item()
        assert (compiled_graphs() > before) == compiled
        networks = {"model": method.model, "prior": method.prior.transformer}
        grads = {f"{part}.{name}": p.grad for part, net in networks.items() for name, p in net.named_parameters() if p.grad is not None}
        steps.append((loss, grads))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = steps
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert eager_grads.keys() == compiled_grads.keys() and {name.split(".")[0] for name in eager_grads} == {"model", "prior"}
    # Some segmenter gradients are rounding noise around zero (≈1e-15: a key's bias cancels in
    # the softmax), so differences are measured against the largest gradient.
    scale = max(float(grad.abs().max()) for grad in eager_grads.values())
    for name, grad in eager_grads.items():
        named = lambda message, name=name: f"{name}: {message}"  # noqa: E731
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=named)


def test_every_window_goes_through_the_loss_scale(models: dict[str, Path], tmp_path: Path) -> None:
    """The fp16 path: every part is multiplied by the scaler's scale, so the unscaled gradients
    equal the fp32 ones (the official code left early windows unscaled, §3.5)."""
    method = dusa_method(models, tmp_path).place([torch.device("cpu")])
    adapter = OnlineAdapter(method, OptimConfig(name="adamw", lr=1e-4), "fp32", torch.device("cpu"))
    images = torch.rand(1, 3, 32, 56)
    torch.manual_seed(5)
    adapter.step(images)  # accumulation 1: steps; take the gradient before the step instead
    adapter.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    method.forward(images)
    reference = [p.grad.clone() for p in adapter.params]
    adapter.optimizer.zero_grad(set_to_none=True)
    adapter.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    torch.manual_seed(5)
    method.forward(images)
    for param, expected in zip(adapter.params, reference):
        assert torch.allclose(param.grad, 1024.0 * expected, rtol=1e-4, atol=1e-7)


def test_segmenter_checkpointing_gives_the_same_gradients(models: dict[str, Path], tmp_path: Path) -> None:
    from transformers.models.segformer.modeling_segformer import SegformerLayer

    images = torch.rand(1, 3, 32, 40)
    gradients, calls = [], []
    for checkpointing in (False, True):
        method = dusa_method(models, tmp_path, segmenter_checkpointing=checkpointing).place([torch.device("cpu")])
        layer = next(m for m in method.model.modules() if isinstance(m, SegformerLayer))
        count = [0]
        layer.attention.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        torch.manual_seed(0)
        method.forward(images)
        gradients.append({n: p.grad for n, p in method.model.named_parameters() if p.grad is not None})
        calls.append(count[0])
    assert calls == [1, 2]  # recomputed in backward
    plain, recomputed = gradients
    assert plain.keys() == recomputed.keys() and len(plain) > 50
    for name, grad in plain.items():
        assert torch.allclose(grad, recomputed[name], rtol=1e-5, atol=1e-8), name


def test_reset_restores_segmenter_and_prior(models: dict[str, Path], tmp_path: Path) -> None:
    method = dusa_method(models, tmp_path).place([torch.device("cpu")])
    adapter = OnlineAdapter(method, OptimConfig(name="adamw", lr=1e-3), "fp32", torch.device("cpu"))
    initial = {key: {k: v.clone() for k, v in part.items()} for key, part in method.state_dict().items()}
    adapter.step(torch.rand(1, 3, 32, 40))
    changed = method.state_dict()
    assert any(not torch.equal(changed["prior"][k], v) for k, v in initial["prior"].items())
    assert any(not torch.equal(changed["model"][k], v) for k, v in initial["model"].items())
    method.load_state_dict(initial)
    for key, part in method.state_dict().items():
        assert all(torch.equal(part[k], v) for k, v in initial[key].items())


def test_update_switches(models: dict[str, Path], tmp_path: Path) -> None:
    frozen = dusa_method(models, tmp_path, update_segmenter="none", update_prior=False).place([torch.device("cpu")])
    assert frozen.parameters() == []
    norm_only = dusa_method(models, tmp_path, update_segmenter="norm", update_prior=False).place([torch.device("cpu")])
    names = {n for n, p in norm_only.model.named_parameters() if p.requires_grad}
    assert names and all("norm" in n or "batch_norm" in n or "layer_norm" in n for n in names)
    with pytest.raises(ConfigError, match="class_names has 2 names"):
        dusa_method(models, tmp_path, class_names=["a", "b"]).place([torch.device("cpu")])
    with pytest.raises(ValueError, match="exactly one"):
        get_method("dusa_seg").Config(name="dusa_seg", prompt_template="a photo")


# ---- the engine and the CLI ----


def test_source_records_match_an_independent_evaluation(models: dict[str, Path], ade_c: Path, tmp_path: Path) -> None:
    result = dusa(
        "baseline", "--task", "seg", "--method", "source", "--corruption", "fog",
        *seg_args(models, ade_c, tmp_path / "source"),  # a baseline: fp32 unless told otherwise
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "source" / "results.json").read_text())["tasks"][0]
    segmenter = create_segmenter(ModelConfig(name="segformer", checkpoint=models["segformer"])).eval()
    from dusa_cli.config.schema import SegDataConfig
    from dusa_cli.data.segmentation import open_seg_task

    score = SegmentationScore()
    data = SegDataConfig(root=ade_c, short_side=32)
    with torch.no_grad():
        for image, label in open_seg_task(ade_c, "fog", 5):
            logits = segmenter(prepare_image(image[None], data))
            score.update(predict_labels(logits, label.shape), label[None])
    expected = score.compute()
    assert record["num_samples"] == 3
    assert record["curve"]["images"] == [1, 2, 3] and "loss" not in record["curve"]  # the online curve
    assert record["curve"]["online_miou"][-1] == pytest.approx(expected["miou"])  # (the run's order is shuffled)
    assert record["miou"] == pytest.approx(expected["miou"])
    assert record["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"])
    assert "mIoU" in result.stdout


def test_a_segmentation_tasks_last_partial_accumulation_is_applied_at_its_end(models: dict[str, Path], ade_c: Path, tmp_path: Path) -> None:
    # 3 images, one per micro-batch, accumulation 2: a step after the second, and the third's
    # gradient applied when the task ends.
    from dusa_cli.config.loader import load_config
    from dusa_cli.engine.loop import run_experiment

    config = load_config(None, {
        "task": "seg", "method.name": "tent", "model.name": "segformer", "model.checkpoint": str(models["segformer"]),
        "data.root": str(ade_c), "data.corruptions": ["fog"], "data.short_side": 32, "optim.accumulation": 2,
        "run.output": str(tmp_path / "run"),
    })  # fmt: skip
    with optimizer_steps() as steps:
        run_experiment(config)
    assert len(steps) == 2


def test_dusa_seg_keeps_batchnorm_running_statistics_unless_only_norm_layers_adapt(models: dict[str, Path]) -> None:
    """The official segmentation runner forces BatchNorm to the image's statistics only in its
    norm-only branch (aux_tta_logits_fp16.py, config_tta_model)."""
    dusa_seg = get_method("dusa_seg")
    for which, batch_statistics in (("all", False), ("norm", True)):
        segmenter = create_segmenter(ModelConfig(name="segformer", checkpoint=models["segformer"]))
        method = dusa_seg(segmenter, dusa_seg.Config(name="dusa_seg", prior=str(models["sd3"]), update_segmenter=which))
        norms = [m for m in method.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms and all(m.training == batch_statistics and (m.running_mean is None) == batch_statistics for m in norms)


def test_tent_scores_the_entropy_at_every_image_pixel(models: dict[str, Path]) -> None:
    """The official baseline's loss: pixel-wise entropy of the logits resized to the image (§3.7)."""
    tent = get_method("tent")
    method = tent(create_segmenter(ModelConfig(name="segformer", checkpoint=models["segformer"])), tent.Config(name="tent"))
    images = torch.rand(1, 3, 32, 48)
    output = method.forward(images)
    assert output.logits.shape[-2:] == (8, 12)  # stride 4: what the prediction upsamples
    resized = torch.nn.functional.interpolate(output.logits, size=(32, 48), mode="bilinear", align_corners=False)
    entropy = torch.distributions.Categorical(logits=resized.movedim(1, -1)).entropy()
    assert output.loss.item() == pytest.approx(entropy.mean().item(), rel=1e-5)


def test_segmentation_baselines_run_end_to_end(models: dict[str, Path], ade_c: Path, tmp_path: Path) -> None:
    methods = ("norm", "tent", "cotta")
    runs = dusa_each(*(
        ("baseline", "--task", "seg", "--method", method, "--corruption", "gaussian_noise", *seg_args(models, ade_c, tmp_path / method))
        for method in methods
    ))  # fmt: skip
    for method, result in zip(methods, runs):
        assert result.returncode == 0, (method, result.stderr)
        results = json.loads((tmp_path / method / "results.json").read_text())
        assert results["status"] == "complete" and results["task"] == "seg"
        assert 0 <= results["summary"]["mean_miou"] <= 1
        loss = results["tasks"][0]["mean_loss"]
        assert loss is None if method == "norm" else math.isfinite(loss)  # norm has no loss
    report = dusa("report", str(tmp_path), "--format", "csv")
    assert report.returncode == 0, report.stderr
    assert report.stdout.startswith("method,seeds,complete,gaussian_noise") and len(report.stdout.splitlines()) == 4
    pixel = {row["method"]: float(row["gaussian_noise"]) for row in csv.DictReader(io.StringIO(dusa("report", str(tmp_path), "--format", "csv", "--metric", "pacc").stdout))}
    assert pixel == {method: pytest.approx(100 * json.loads((tmp_path / method / "results.json").read_text())["tasks"][0]["pixel_accuracy"], abs=1e-3)
                     for method in methods}  # fmt: skip


def test_adapt_seg_split_over_two_devices_equals_one(models: dict[str, Path], ade_c: Path, tmp_path: Path) -> None:
    # Exactly 5 classes per window (every pixel's top 5 alone fill the cap) rather than about 20: the
    # prior's batches are 4 times smaller, the code the same.
    common = ["--prior", str(models["sd3"]), "--corruption", ",".join(CORRUPTIONS), "--set", f"method.prompt_cache={tmp_path / 'cache'}",
              "--set", "method.classes_threshold=5", *WINDOWS]  # fmt: skip
    one = dusa("adapt-seg", *seg_args(models, ade_c, tmp_path / "one"), *common)
    assert one.returncode == 0, one.stderr
    assert list((tmp_path / "cache").glob("prompts-*.safetensors"))  # encoded once, then read
    two = dusa("adapt-seg", *seg_args(models, ade_c, tmp_path / "two"), *common, "--gpus", "cpu,cpu")
    assert two.returncode == 0, two.stderr
    first, second = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two"))
    assert [t["corruption"] for t in first["tasks"]] == list(CORRUPTIONS)
    for a, b in zip(first["tasks"], second["tasks"]):
        assert a["miou"] == pytest.approx(b["miou"]) and a["mean_loss"] == pytest.approx(b["mean_loss"], rel=1e-4)
    assert yaml_split(tmp_path / "two") == ["cpu", "cpu"]


def yaml_split(run: Path) -> list[str]:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["run"]["split_devices"]


def test_segmentation_errors_are_one_line(models: dict[str, Path], ade_c: Path, tmp_path: Path) -> None:
    seg_preset = str(Path(__file__).parents[1] / "configs" / "seg" / "ade20k_c_segformer_b5.yaml")
    assert_one_line_errors(
        (("adapt-seg", *seg_args(models, ade_c, tmp_path / "a", "--corruption", "fog")), 2, "needs method.prior"),
        (("adapt-seg", *seg_args(models, ade_c, tmp_path / "b"), "--prior", str(tmp_path / "nowhere")), 1, "nowhere"),
        (("adapt-seg", "--method", "tent", *seg_args(models, ade_c, tmp_path / "c")), 2, "runs with `dusa baseline`"),
        (("baseline", "--task", "seg", "--method", "dusa", *seg_args(models, ade_c, tmp_path / "d")), 2, "serves task cls"),
        (("baseline", "-c", seg_preset, "--method", "source", "--data", str(ade_c), "--corruption", "fog", "--set", "model.checkpoint=null", "-o", str(tmp_path / "e")),
         2, "needs model.checkpoint"),
        (("baseline", "-c", seg_preset, "--method", "source", "--data", str(ade_c), "--checkpoint", str(tmp_path / "none"), "-o", str(tmp_path / "g")),
         1, f"not found: model.checkpoint {tmp_path / 'none'}"),
        # before any GPU is looked for
        (("baseline", "--task", "seg", "--method", "source", *seg_args(models, ade_c, tmp_path / "f"), "--gpus", "0,1"),
         2, "segmentation baselines run on one device"),
    )  # fmt: skip
