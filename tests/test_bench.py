"""`dusa bench cls --tiny`: the benchmark's code path runs on a CPU and reports consistent figures."""

import gzip
import json
from pathlib import Path

import pytest

from dusa_cli.bench.cls import FAST, file_stem, parse_variant, vary
from dusa_cli.engine.profiling import covered, time_by_kind
from dusa_cli.errors import ConfigError
from helpers import assert_one_line_error, dusa, dusa_each


def test_tiny_bench_runs_both_recipes_side_by_side(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    result = dusa("bench", "cls", "--tiny", "--updates", "1", "--warmup", "0", "--device", "cpu", "-o", str(output))
    assert result.returncode == 0, result.stderr
    assert "fast / official" in result.stdout and "no warm-up: the timed updates include one-off costs" in result.stdout
    assert "] recipe 2/2 fast: timed update 1/1" in result.stderr  # the progress line, one per step in a log
    figures = json.loads(output.read_text())
    official, fast = figures["recipes"]
    assert (official["name"], official["micro_batch"], official["accumulation"]) == ("official", 8, 8)
    assert (fast["name"], fast["micro_batch"], fast["accumulation"]) == ("fast", 16, 4)
    assert official["precision"] == "fp16" and official["classifier_fp32"] and fast["precision"] == "bf16"
    assert not fast["compile_prior"] and not fast["fused_adam"]  # CPU rows say what actually ran
    for row in (official, fast):
        assert row["images_per_update"] == 64 and row["seconds"] > 0
        assert row["images_per_s"] == pytest.approx(row["updates"] * 64 / row["seconds"])  # per image, not per update
        assert row["tflops"] == pytest.approx(row["tflop_per_image"] * row["images_per_s"])
        assert row["bf16_peak_tflops"] is None and row["fraction_of_bf16_peak"] is None  # no measured CPU peak
    # Same objective and shapes: the same FLOPs per image whatever the recipe.
    assert official["tflop_per_image"] == fast["tflop_per_image"] > 0
    assert figures["ratio_fast_over_official"] == pytest.approx(fast["images_per_s"] / official["images_per_s"])
    assert figures["complete"] and figures["warmup"] == 0


@pytest.mark.parametrize(("args", "problem"), [
    (["cls", "--trajectory", "1", "--updates", "3", "--profile", "p"], "--updates, --profile have no effect with --trajectory"),
    (["cls", "--tolerance", "0.1"], "--tolerance has no effect without --trajectory"),
    (["cls", "--recipe", "official", "--micro-batch", "32"], "--micro-batch has no effect (they change the fast recipe"),
    (["cls", "--variant", "micro-batch=32,micro-batch=8"], "--variant 'micro-batch=32,micro-batch=8' sets micro-batch twice"),
    (["seg", "--recipe", "baseline", "--checkpointing", "1"], "--checkpointing has no effect (it changes the fast recipe"),
])  # fmt: skip
def test_bench_options_that_would_do_nothing_are_usage_errors(tmp_path: Path, args: list[str], problem: str) -> None:
    assert_one_line_error(dusa("bench", *args, "--tiny", cwd=tmp_path), 2, problem)
    assert not (tmp_path / "p").exists()


def test_the_bench_prior_is_not_zero_so_the_classifier_learns_through_it() -> None:
    """DiT's adaLN-Zero init makes a random prior predict exactly 0: no gradient would reach the
    classifier and the trajectory check could not tell bf16 from fp32."""
    import tempfile

    import torch

    from dusa_cli.bench.cls import FP32, TINY, _build, _images, _random_vae

    with tempfile.TemporaryDirectory() as scratch:
        adapter = _build(TINY, FP32, _random_vae(Path(scratch), tiny=True), torch.device("cpu"))
    adapter.method.forward(_images(4, TINY, torch.device("cpu"))).loss.backward()
    gradients = [p.grad for p in adapter.method.model.parameters() if p.grad is not None]
    assert gradients and any(g.abs().sum() > 0 for g in gradients)


def test_tiny_seg_bench_splits_over_devices_and_reports_each(tmp_path: Path) -> None:
    output, profiles = tmp_path / "bench_seg.json", tmp_path / "profiles"
    args = ["--updates", "1", "--warmup", "0", "--gpus", "cpu,cpu", "--profile", str(profiles), "-o", str(output), "-f", "md"]
    result = dusa("bench", "seg", "--tiny", *args)
    assert result.returncode == 0, result.stderr
    figures = json.loads(output.read_text())
    # Markdown to paste into docs/BENCHMARKS.md: the exact command, then both tables, figures as in the JSON.
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"`dusa bench seg --tiny {' '.join(args[:6])}") and " · torch " in lines[0]
    assert lines[2].startswith("**DUSA segmentation window update (") and lines[4] == "| recipe | checkpointing | compiled | s / window | peak GiB per device |"
    assert lines[5] == "|---|---:|---:|---:|---:|"
    for row, line in zip(figures["recipes"], lines[6:8]):
        assert line.startswith(f"| {row['name']} | all | no | {row['seconds_per_window']:.3f} | ")
    assert lines[9] == f"baseline / fast = {figures['speedup_fast_over_baseline']:.2f}×; no warm-up: the timed updates include one-off costs"
    assert "**Where one update's time goes**" in lines and "| kind of work | baseline ms | fast ms |" in lines
    for row in figures["recipes"]:  # one profiled window update per recipe, its files on disk
        profile = row["profile"]
        assert Path(profile["trace"]) == profiles / f"{row['name']}.trace.json.gz"
        assert "traceEvents" in json.loads(gzip.open(profile["trace"]).read())  # a Chrome trace
        assert "aten::" in Path(profile["ops"]).read_text()
        assert profile["ms_by_kind"]["matmul"] > 0 and profile["wall_ms"] > 0
        assert profile["busy_fraction"] is None  # a GPU measure
        # Whole paths, one line per recipe (as a table caption they wrapped mid-name).
        assert f"profile of {row['name']}: {profile['trace']}, {profile['ops']}" in result.stderr.splitlines()
    assert figures["devices"] == ["cpu", "cpu"] and figures["classes"] == 20
    names = [row["name"] for row in figures["recipes"]]
    assert names == ["baseline", "fast"]
    for row in figures["recipes"]:
        assert row["seconds_per_window"] > 0 and row["peak_memory_devices"] == ["cpu"] and len(row["peak_memory_gib"]) == 1  # one device, measured once
        assert row["gradient_checkpointing"] and not row["compile_blocks"]  # CPU rows say what ran
        assert set(row["block_devices"]) == {"cpu"} and len(row["block_devices"]) == 2
    assert figures["speedup_fast_over_baseline"] == pytest.approx(
        figures["recipes"][0]["seconds_per_window"] / figures["recipes"][1]["seconds_per_window"]
    )


def test_tiny_trajectory_check_compares_fast_with_fp32(tmp_path: Path) -> None:
    output, again = tmp_path / "trajectory.json", tmp_path / "again.json"
    result, strict = dusa_each(
        ("bench", "cls", "--tiny", "--trajectory", "2", "--device", "cpu", "-o", str(output)),
        ("bench", "cls", "--tiny", "--trajectory", "1", "--device", "cpu", "--tolerance", "0", "-o", str(again)),
    )
    assert result.returncode == 0, result.stderr
    assert "] fast: update 2/2" in result.stderr
    figures = json.loads(output.read_text())
    reference, candidate = figures["reference"], figures["candidate"]
    assert reference["recipe"]["precision"] == "fp32" and candidate["recipe"]["precision"] == "bf16"
    assert len(reference["losses"]) == len(candidate["losses"]) == 2
    deviation = max(abs(b - a) / a for a, b in zip(reference["losses"], candidate["losses"]))
    assert figures["max_relative_loss_deviation"] == pytest.approx(deviation) and deviation < 0.01
    assert 0.5 < figures["prediction_agreement"] <= 1
    assert deviation > 1e-6  # bf16 is not fp32: the check can see a difference (the prior's output is not zero)
    assert strict.returncode == 1 and "more than --tolerance" in strict.stderr
    assert json.loads(again.read_text())["reference"]["losses"][0] == reference["losses"][0]  # seeded models: a rerun repeats


def test_a_recipe_that_does_not_fit_is_a_row_not_a_crash() -> None:
    import io

    import torch
    from rich.console import Console

    from dusa_cli.bench.cls import FAST, OFFICIAL, to_rich
    from dusa_cli.bench.timing import ratio, unless_out_of_memory

    def too_big() -> dict:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    fitted = {"name": "official", "images_per_s": 30.0}
    row = unless_out_of_memory(FAST, too_big)
    assert row["out_of_memory"] and row["name"] == "fast" and row["micro_batch"] == 16
    assert ratio([fitted, row], "images_per_s", "fast", "official") is None
    assert ratio([fitted, {"name": "fast", "images_per_s": 60.0}], "images_per_s", "fast", "official") == 2.0
    official = unless_out_of_memory(OFFICIAL, lambda: {**OFFICIAL.__dict__, "images_per_s": 30.0, "tflops": 1.0,
                                                        "fraction_of_bf16_peak": 0.1, "peak_memory_gib": 2.0})
    result = {"shapes": {"classifier": "c", "prior": "p"}, "device_name": "cpu", "recipes": [official, row],
              "ratio_fast_over_official": None, "warmup": 2}
    console = Console(file=io.StringIO(), width=200)
    console.print(to_rich(result))
    assert "out of memory" in console.file.getvalue()


def test_a_recipe_that_fails_is_a_row_and_a_warning_and_the_others_still_run() -> None:
    from dusa_cli.bench.cls import FAST, FP32, OFFICIAL, run_recipes

    def run(recipe, say) -> dict:
        if recipe is FAST:
            raise RuntimeError("Inductor could not lower aten.foo. See the log")
        return {"name": recipe.name, "images_per_s": 1.0}

    with pytest.warns(UserWarning, match=r"^recipe fast failed: RuntimeError: Inductor could not lower aten.foo$"):
        result = run_recipes((OFFICIAL, FAST, FP32), run, lambda rows: {"recipes": list(rows)})
    official, fast, fp32 = result["recipes"]
    assert fast["failed"] == "RuntimeError: Inductor could not lower aten.foo" and fast["micro_batch"] == 16
    assert fp32 == {"name": "fp32", "images_per_s": 1.0} and result["complete"]


def test_counting_flops_leaves_compiled_networks_compiled() -> None:
    """Dynamo skips a frame run under FlopCounterMode and remembers the skip: counted first, a
    compiled prior would have stayed eager for the whole recipe, under a "compiled" label."""
    import tempfile

    import torch

    from dusa_cli.bench.cls import FP32, TINY, _build, _images, _random_vae, flops_per_image

    graphs = []

    def counting_backend(graph: torch.fx.GraphModule, inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    with tempfile.TemporaryDirectory() as scratch:
        adapter = _build(TINY, FP32, _random_vae(Path(scratch), tiny=True), torch.device("cpu"))
    adapter.method.prior.transformer.compile(backend=counting_backend)
    images = _images(2, TINY, torch.device("cpu"))
    try:
        assert flops_per_image(adapter, images[:1]) > 0 and not graphs
        adapter.method.forward(images)
        assert graphs
    finally:
        torch.compiler.reset()


def test_flops_include_the_attention_kernel_sdpa_runs_on_a_cpu() -> None:
    """torch counts its CUDA attention kernels only: a CPU count of DiT would miss attention."""
    import torch
    import torch.nn.functional as F

    from dusa_cli.bench.cls import counting_flops

    query, key, value = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    with counting_flops() as fused:
        F.scaled_dot_product_attention(query, key, value).sum().backward()
    with torch.no_grad(), counting_flops() as spelled_out:
        torch.softmax(query @ key.transpose(-1, -2) / 8**0.5, dim=-1) @ value
    forward = spelled_out.get_total_flops()
    # The backward as torch counts its CUDA kernels: the scores recomputed, then four products.
    assert forward > 0 and fused.get_total_flops() == forward + 5 * forward // 2


def test_the_fast_recipe_can_be_varied_lever_by_lever(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    args = ["bench", "cls", "--tiny", "--recipe", "fast", "--micro-batch", "32", "--checkpointing", "1", "--prior", "sit"]
    variant = ["--variant", "micro-batch=64,channels-last=true,checkpointing=0"]  # one more row, from the varied fast recipe
    result, *refused = dusa_each(
        (*args, *variant, "--updates", "1", "--warmup", "0", "--device", "cpu", "-o", str(output)),
        ("bench", "cls", "--tiny", "--micro-batch", "5"),
        *(("bench", "cls", "--tiny", "--recipe", "fast", "--checkpointing", blocks, "--device", "cpu") for blocks in ("some", "3")),
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(output.read_text())
    assert figures["shapes"]["prior"] == "sit_tiny"  # the flow prior's step (velocity target)
    fast, varied = figures["recipes"]
    assert (fast["micro_batch"], fast["accumulation"], fast["gradient_checkpointing"]) == (32, 2, 1)
    assert fast["images_per_update"] == varied["images_per_update"] == 64
    assert varied["name"] == "fast mb=64 nhwc=true ckpt=0"
    assert (varied["micro_batch"], varied["channels_last"], varied["gradient_checkpointing"]) == (64, True, 0)
    assert varied["tflop_per_image"] == fast["tflop_per_image"]  # the model's work, without the recompute
    messages = ("must divide the 64 images", "takes 'all' or a number of blocks", "outside 0..2")
    for bad, message in zip(refused, messages, strict=True):
        assert bad.returncode == 2 and message in bad.stderr


def test_figures_so_far_are_handed_on_after_every_recipe() -> None:
    """A benchmark stopped part-way (a device's time limit) keeps the rows it finished."""
    import torch

    from dusa_cli.bench.cls import FAST, FP32, OFFICIAL, run_recipes

    def run(recipe, say) -> dict:
        say("building the models")
        if recipe is FAST:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"name": recipe.name, "images_per_s": 1.0}

    seen: list[dict] = []
    said: list[str] = []
    final = run_recipes((OFFICIAL, FAST, FP32), run, lambda rows: {"recipes": list(rows)}, seen.append, said.append)
    assert said == [f"recipe {i}/3 {name}: building the models" for i, name in enumerate(("official", "fast", "fp32"), 1)]
    assert [[row["name"] for row in result["recipes"]] for result in seen] == [
        ["official"], ["official", "fast"], ["official", "fast", "fp32"]
    ]
    assert [result["complete"] for result in seen] == [False, False, True]
    assert seen[1]["recipes"][1]["out_of_memory"] and final == seen[-1]


def test_the_share_of_the_peak_needs_a_measured_peak() -> None:
    from dusa_cli.bench.cls import bf16_peak_tflops

    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == bf16_peak_tflops("NVIDIA H200") == 798.0
    assert bf16_peak_tflops("NVIDIA A100-SXM4-80GB") is None and bf16_peak_tflops("cpu") is None


def test_profiled_work_is_sorted_into_kinds_by_kernel_name() -> None:
    kernels = [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", 500.0),  # cuBLAS
        ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTN", 300.0),
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", 200.0),  # cuDNN conv
        ("conv_depthwise2d_backward_grad_weight_kernel", 50.0),
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<96, 128, 64, 4>>", 100.0),
        ("triton_poi_fused_add_convolution_mul_0", 40.0),  # inductor's epilogue, not a conv
        ("triton_tem_fused_mm_1", 60.0),  # an autotuned matmul template
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdam>", 30.0),
        ("Memcpy HtoD (Pinned -> Device)", 5.0),
        ("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>", 20.0),
        ("aten::addmm", 1000.0),  # CPU operators go by the same names
    ]
    assert time_by_kind(kernels) == {
        "matmul": 1.86, "convolution": 0.25, "attention": 0.1, "fused (compiled)": 0.04,
        "optimizer": 0.03, "other": 0.02, "copies": 0.005,
    }  # fmt: skip
    # Kernels overlapping on two streams count once towards the busy time.
    assert covered([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17


def test_a_variant_names_the_levers_it_changes_and_rejects_unknown_ones() -> None:
    varied = vary(FAST, parse_variant("checkpointing=all, compile-mode=reduce-overhead,compile-classifier=yes"))
    assert varied.name == "fast ckpt=all mode=reduce-overhead ccls=yes"
    assert (varied.gradient_checkpointing, varied.compile_mode, varied.compile_classifier) == (True, "reduce-overhead", True)
    assert (varied.micro_batch, varied.compile_prior, varied.fused_adam) == (FAST.micro_batch, True, True)  # the rest is fast's
    assert file_stem(varied.name) == "fast_ckpt_all_mode_reduce-overhead_ccls_yes"
    for text, message in (
        ("micro-batch", "LEVER=VALUE pairs"), ("batch=32", "LEVER=VALUE pairs"), ("micro-batch=0", "positive number"),
        ("micro-batch=24", "must divide the 64 images"), ("channels-last=maybe", "true or false"),
        ("compile-mode=fastest", "one of default"), ("checkpointing=most", "'all' or a number"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            vary(FAST, parse_variant(text))


def test_a_row_that_asked_for_compile_and_compiled_nothing_says_it_ran_eager() -> None:
    from dataclasses import asdict

    from dusa_cli.bench.cls import FAST, OFFICIAL, compiled_label

    assert compiled_label(asdict(FAST) | {"compiled_graphs": 12}) == "prior"
    assert compiled_label(asdict(FAST) | {"compiled_graphs": 0}) == "prior: ran eager"
    assert compiled_label(asdict(OFFICIAL) | {"compiled_graphs": 0}) == "no"


def test_the_paper_sized_bench_is_not_started_on_a_machine_without_a_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the bench would run")
    hint = "one update takes many minutes on a CPU; --tiny runs small shapes"
    assert_one_line_error(dusa("bench", "cls", "--trajectory", "2", cwd=tmp_path), 1, f"no GPU here: at the paper's shapes {hint} (--device cpu runs")
    assert_one_line_error(dusa("bench", "seg", cwd=tmp_path), 1, f"{hint} (--gpus cpu runs the full ones anyway)")


def test_a_row_counts_one_images_flops_and_its_share_of_a_measured_peak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU has no measured peak; on a device called an H100 the row's share is of 798 TFLOP/s."""
    from dataclasses import replace

    import torch

    from dusa_cli.bench import cls
    from dusa_cli.bench.cls import FP32, TINY, _build, _images, _random_vae, flops_per_image, run_recipe

    cpu = torch.device("cpu")
    vae = _random_vae(tmp_path, tiny=True)
    monkeypatch.setattr(cls, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    row = run_recipe(replace(FP32, micro_batch=2, accumulation=1), TINY, updates=1, warmup=0, device=cpu, vae=vae)
    assert row["bf16_peak_tflops"] == 798.0 and row["fraction_of_bf16_peak"] == pytest.approx(row["tflops"] / 798.0)
    adapter = _build(TINY, FP32, vae, cpu)
    images = _images(2, TINY, cpu)
    one = flops_per_image(adapter, images[:1])
    assert flops_per_image(adapter, images) == 2 * one  # the work per image does not depend on the batch
    assert row["tflop_per_image"] == one / 1e12


def test_the_timer_starts_after_the_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from dusa_cli.bench import timing

    clock = [0.0]

    def update() -> None:  # each update takes 10 s on a clock of its own
        clock[0] += 10.0

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    assert timing.time_updates(update, warmup=2, updates=3, devices=[], say=lambda text: None) == 30.0
