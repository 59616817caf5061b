"""The Stable Diffusion 3 prior on a tiny random SD3 folder: flow path vs the diffusers scheduler,
text conditioning vs the diffusers pipeline, the prompt cache, loading and its errors, encoding,
prediction, model-parallel placement (outputs and gradients unchanged) and eval mode."""

from __future__ import annotations

import os
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from tiny_sd3 import IMAGE_SIZE, LATENT_SIZE, SHIFT, TRANSFORMER, VAE, write_tiny_sd3

import dusa_cli._compat  # noqa: F401  (torchvision shim before timm/diffusers)
from dusa_cli.errors import ConfigError, DusaError
from dusa_cli.priors import SD3FlowPath, SD3Prior, create_path
from dusa_cli.priors import split
from dusa_cli.priors.prompts import PromptEmbeddings, _cache_key, default_t5_dtype, encode_prompts, load_prompt_embeddings
from dusa_cli.priors.sd3 import SD3_MEDIUM_TRANSFORMER, SD3_VAE, random_prompt_embeddings
from dusa_cli.priors.split import balance_blocks, module_bytes, place_transformer, training_bytes

PROMPTS = ["a photo of a wall", "a photo of a bed ", "a photo of a sky", "a photo of a person"]
T5_LENGTH = 12  # a short T5 sequence keeps the tiny models quick; the layout is the same at 256
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sd3(tmp_path_factory.mktemp("sd3") / "sd3", t5=True)


@pytest.fixture
def sd3_copy(sd3_dir: Path, tmp_path: Path) -> Path:
    """A private copy, for tests that damage the folder."""
    return Path(shutil.copytree(sd3_dir, tmp_path / "sd3"))


def load_prior(folder: Path, devices: list[torch.device] | None = None, **options) -> SD3Prior:
    options.setdefault("max_sequence_length", T5_LENGTH)
    options.setdefault("cache_dir", folder.parent / "prompt-cache")  # encode once per folder
    return SD3Prior.from_pretrained(folder, prompts=PROMPTS, devices=devices or [CPU], **options)


def pipeline_conditioning(folder: Path, prompts: list[str], use_t5: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What the diffusers SD3 pipeline itself feeds its transformer for these prompts."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    pipeline = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(folder / "transformer"),
        vae=AutoencoderKL.from_pretrained(folder / "vae"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        text_encoder_3=T5EncoderModel.from_pretrained(folder / "text_encoder_3") if use_t5 else None,
        tokenizer_3=T5TokenizerFast.from_pretrained(folder / "tokenizer_3") if use_t5 else None,
    )
    with torch.no_grad():
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=T5_LENGTH
        )
    return embeds, pooled


def velocity_and_gradients(prior: SD3Prior, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A DUSA-like step: class-weighted velocity error, back-propagated to the weights (as the
    segmenter's logits would be) and to every transformer parameter."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(3, 16, LATENT_SIZE, LATENT_SIZE, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    weights = torch.rand(3, 1, LATENT_SIZE, LATENT_SIZE, generator=generator).requires_grad_()
    sigma = torch.full((3,), 0.25)
    prior.transformer.zero_grad()
    velocity = prior.predict(prior.path.add_noise(latents, noise, sigma), sigma, torch.tensor([3, 0, 2]))
    loss = ((weights * velocity).sum(0) - (noise - latents).mean(0)).square().mean()
    loss.backward()
    return velocity.detach(), weights.grad, [p.grad.clone() for p in prior.trainable_parameters()]


# --- noise path ---------------------------------------------------------------------------------


def test_sd3_flow_path_matches_the_diffusers_scheduler() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    path = SD3FlowPath()
    torch.testing.assert_close(path.model_time(scheduler.sigmas), scheduler.timesteps)

    x0, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    step = torch.tensor([700, 100])
    expected = scheduler.scale_noise(x0, scheduler.timesteps[step], noise)
    torch.testing.assert_close(path.add_noise(x0, noise, scheduler.sigmas[step]), expected)
    torch.testing.assert_close(path.target(x0, noise), noise - x0)
    assert path.name == "sd3_flow" and path.default_timestep == 0.25
    assert type(create_path("sd3_flow")) is SD3FlowPath  # by name, as a prior preset names its path


# --- prompts ------------------------------------------------------------------------------------


def test_conditioning_pads_clip_and_appends_zero_t5_tokens() -> None:
    clip, pooled = torch.randn(5, 77, 28), torch.randn(5, 16)
    states, selected_pooled = PromptEmbeddings(clip, pooled).conditioning(torch.tensor([4, 1]), 32, T5_LENGTH)
    assert states.shape == (2, 77 + T5_LENGTH, 32)
    torch.testing.assert_close(states[:, :77, :28], clip[[4, 1]])
    assert not states[:, :77, 28:].any() and not states[:, 77:].any()
    torch.testing.assert_close(selected_pooled, pooled[[4, 1]])

    t5 = torch.randn(5, T5_LENGTH, 32)
    states, _ = PromptEmbeddings(clip, pooled, t5).conditioning(torch.tensor([2]), 32, T5_LENGTH)
    torch.testing.assert_close(states[:, 77:], t5[[2]])
    with pytest.raises(DusaError, match="T5 states"):
        PromptEmbeddings(clip, pooled, t5).conditioning(torch.tensor([2]), 32, 256)
    with pytest.raises(DusaError, match="CLIP states have 28 channels, more than the transformer's 24"):
        PromptEmbeddings(clip, pooled).conditioning(torch.tensor([2]), 24, T5_LENGTH)  # not cut to fit


@pytest.mark.parametrize("use_t5", [False, True])
def test_prompt_conditioning_equals_the_pipeline(sd3_dir: Path, use_t5: bool) -> None:
    embeddings = encode_prompts(sd3_dir, PROMPTS, use_t5=use_t5, max_sequence_length=T5_LENGTH)
    assert embeddings.clip.shape == (4, 77, 12 + 16) and embeddings.pooled.shape == (4, 6 + 10)
    classes = torch.tensor([3, 0, 2])
    states, pooled = embeddings.conditioning(classes, TRANSFORMER["joint_attention_dim"], T5_LENGTH)
    expected_states, expected_pooled = pipeline_conditioning(sd3_dir, PROMPTS, use_t5)
    torch.testing.assert_close(states, expected_states[classes])
    torch.testing.assert_close(pooled, expected_pooled[classes])
    assert states[:, 77:].any() == use_t5  # the T5 states, or the zeros standing in for them


def test_t5_runs_in_bf16_on_a_gpu_and_its_states_stay_fp32(sd3_dir: Path) -> None:
    assert default_t5_dtype("cuda:0") == torch.bfloat16 and default_t5_dtype("cpu") == torch.float32
    fp32 = encode_prompts(sd3_dir, PROMPTS, use_t5=True, max_sequence_length=T5_LENGTH)
    bf16 = encode_prompts(sd3_dir, PROMPTS, use_t5=True, max_sequence_length=T5_LENGTH, t5_dtype=torch.bfloat16)
    assert bf16.t5.dtype == torch.float32 and not torch.equal(bf16.t5, fp32.t5)
    torch.testing.assert_close(bf16.t5, fp32.t5, rtol=0.05, atol=0.05)
    torch.testing.assert_close(bf16.clip, fp32.clip)  # the CLIPs stay in fp32


def test_prompt_cache_hits_without_reading_the_encoders(sd3_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    def load(prompts: list[str], use_t5: bool = False, length: int = T5_LENGTH) -> PromptEmbeddings:
        return load_prompt_embeddings(
            sd3_copy, prompts, use_t5=use_t5, max_sequence_length=length, cache_dir=cache
        )

    first = load(PROMPTS)
    load(PROMPTS)
    assert len(list(cache.glob("prompts-*.safetensors"))) == 1
    load(PROMPTS[:2])  # other prompts
    with_t5 = load(PROMPTS, use_t5=True)
    assert len(list(cache.glob("prompts-*.safetensors"))) == 3 and with_t5.t5 is not None
    assert load(PROMPTS, use_t5=True, length=T5_LENGTH + 4).t5.shape[1] == T5_LENGTH + 4  # another T5 length
    assert len(list(cache.glob("prompts-*.safetensors"))) == 4
    # T5 in bf16 on a GPU, in fp32 on a CPU: other embeddings, another entry (the CLIPs alone: one).
    key = partial(_cache_key, sd3_copy, PROMPTS, max_sequence_length=T5_LENGTH)
    assert key(use_t5=True, device="cuda") != key(use_t5=True, device="cpu")
    assert key(use_t5=False, device="cuda") == key(use_t5=False, device="cpu")

    # Same paths, sizes and times, unusable content: only a cache hit can still succeed.
    for weights in sd3_copy.glob("text_encoder*/*.safetensors"):
        status = weights.stat()
        weights.write_bytes(bytes(status.st_size))
        os.utime(weights, ns=(status.st_atime_ns, status.st_mtime_ns))
    hit = load(PROMPTS)
    torch.testing.assert_close(hit.tensors(), first.tensors())
    assert hit.t5 is None
    with pytest.raises(DusaError, match="cannot load .*text_encoder"):
        load(["a photo of a tree"])  # a miss, which must read them


def test_prompt_cache_misses_for_other_weights_of_the_same_architecture(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first, second = write_tiny_sd3(tmp_path / "first", seed=0), write_tiny_sd3(tmp_path / "second", seed=1)

    def load(folder: Path) -> PromptEmbeddings:
        return load_prompt_embeddings(folder, PROMPTS, use_t5=False, cache_dir=cache)

    first_embeddings = load(first)
    second_embeddings = load(second)  # same configs, file names and sizes: must not hit first's entry
    assert len(list(cache.glob("prompts-*.safetensors"))) == 2
    torch.testing.assert_close(second_embeddings.tensors(), encode_prompts(second, PROMPTS, use_t5=False).tensors())
    assert not torch.equal(second_embeddings.clip, first_embeddings.clip)
    torch.testing.assert_close(load(first).tensors(), first_embeddings.tensors())  # the same folder hits
    assert len(list(cache.glob("prompts-*.safetensors"))) == 2

    # Weights rewritten in place with others of the same size: a miss, encoded from the new files.
    for weights in second.glob("text_encoder*/*.safetensors"):
        shutil.copyfile(weights, first / weights.relative_to(second))
    torch.testing.assert_close(load(first).tensors(), second_embeddings.tensors())


# --- loading ------------------------------------------------------------------------------------


def test_from_pretrained_reads_the_folder(sd3_copy: Path) -> None:
    prior = load_prior(sd3_copy)
    assert prior.transformer.config.num_layers == TRANSFORMER["num_layers"]
    assert prior.vae.config.scaling_factor == 1.5305 and prior.vae.config.shift_factor == 0.0609
    assert len(prior.prompts) == len(PROMPTS) and prior.prompts.t5 is None and prior.t5_length == T5_LENGTH
    assert prior.block_devices == [CPU] * TRANSFORMER["num_layers"]
    assert not any(p.requires_grad for p in prior.vae.parameters())
    assert {id(p) for p in prior.trainable_parameters()} == {id(p) for p in prior.transformer.parameters()}
    assert all(p.requires_grad for p in prior.trainable_parameters())



@pytest.mark.parametrize("missing", ["transformer", "vae", "text_encoder", "tokenizer_2", "text_encoder_3", "."])
def test_missing_folders_are_one_line_errors(sd3_copy: Path, missing: str) -> None:
    shutil.rmtree(sd3_copy / missing)
    with pytest.raises(DusaError) as error:
        load_prior(sd3_copy, use_t5=True)
    message = str(error.value)
    assert "\n" not in message and str(sd3_copy / missing) in message  # sd3_copy / "." is sd3_copy
    if missing == "text_encoder_3":
        assert "optional" in message


def test_prior_from_config_and_the_sd3_medium_architecture() -> None:
    prompts = random_prompt_embeddings(3, clip_dim=28, pooled_dim=16, generator=torch.Generator().manual_seed(0))
    prior = SD3Prior.from_config(TRANSFORMER, VAE, prompts, devices=[CPU], max_sequence_length=T5_LENGTH)
    latents = torch.randn(2, 16, LATENT_SIZE, LATENT_SIZE)
    assert prior.predict(latents, torch.tensor([0.2, 0.7]), torch.tensor([0, 2])).shape == latents.shape

    from diffusers import AutoencoderKL, SD3Transformer2DModel

    with torch.device("meta"):  # shapes only: 2B parameters would not fit a test
        transformer, vae = SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER), AutoencoderKL(**SD3_VAE)
    assert sum(p.numel() for p in transformer.parameters()) == 2_028_328_000  # SD3 "medium" (2B)
    assert transformer.pos_embed.pos_embed.shape == (1, 192 * 192, 1536)
    assert vae.config.latent_channels == 16 and vae.encoder.conv_out.out_channels == 32  # mean ‖ logvar


# --- encode and predict -------------------------------------------------------------------------


def test_encode_is_the_shifted_scaled_posterior_mean(sd3_dir: Path) -> None:
    prior = load_prior(sd3_dir)
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    latents = prior.encode(images)
    with torch.no_grad():
        mean = prior.vae.encode(images * 2 - 1).latent_dist.mean
    assert latents.shape == (2, 16, LATENT_SIZE, LATENT_SIZE)
    torch.testing.assert_close(latents, (mean - 0.0609) * 1.5305)
    with pytest.raises(ConfigError, match="multiples of 16"):
        prior.encode(torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE - 8))


@pytest.mark.parametrize("use_t5", [False, True])
def test_predict_equals_the_transformer_with_the_pipeline_conditioning(sd3_dir: Path, use_t5: bool) -> None:
    prior = load_prior(sd3_dir, use_t5=use_t5)
    noisy = torch.randn(3, 16, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(2))
    sigma, classes = torch.tensor([0.1, 0.25, 0.9]), torch.tensor([3, 0, 3])
    states, pooled = pipeline_conditioning(sd3_dir, PROMPTS, use_t5)
    with torch.no_grad():
        velocity = prior.predict(noisy, sigma, classes)
        expected = prior.transformer(
            noisy, encoder_hidden_states=states[classes], pooled_projections=pooled[classes], timestep=sigma * 1000
        ).sample
    torch.testing.assert_close(velocity, expected)
    assert velocity.abs().mean() > 0.1  # random weights, not the zero-initialised output


# --- model-parallel placement -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block_bytes", "num_devices", "first_extra", "last_extra", "starts"),
    [
        ([1] * 24, 2, 0, 0, [0, 12]),
        ([1] * 24, 2, 4, 0, [0, 10]),  # 4 + 10 = 14 on the first device
        ([2, 2, 2, 2], 2, 0, 4, [0, 3]),  # 6 | 2 + 4
        ([4, 1, 1, 1, 1, 4], 3, 0, 0, [0, 1, 5]),  # 4 | 4 | 4, not 5 | 3 | 4
        ([3, 3, 3], 1, 5, 5, [0]),
        ([5, 5], 3, 0, 0, [0, 1, 2]),  # more devices than blocks: the last one holds none
    ],
)
def test_balance_blocks_minimises_the_largest_device(
    block_bytes: list[int], num_devices: int, first_extra: int, last_extra: int, starts: list[int]
) -> None:
    assert balance_blocks(block_bytes, num_devices, first_extra, last_extra) == starts


@pytest.mark.parametrize("split", [[1, 2], [0, 0], [0, 4], [0], [0, 2, 1]])
def test_bad_split_is_a_config_error(split: list[int]) -> None:
    from diffusers import SD3Transformer2DModel

    devices = [torch.device("cpu", index) for index in range(max(2, len(split)))]
    with pytest.raises(ConfigError, match="split") as error:
        place_transformer(SD3Transformer2DModel(**TRANSFORMER), devices, split)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("num_devices", [2, 3])
def test_split_prior_gives_the_same_outputs_and_gradients(sd3_dir: Path, num_devices: int, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = velocity_and_gradients(load_prior(sd3_dir))
    moved_to: dict[torch.nn.Module, torch.device] = {}  # where each placed module moves its inputs
    move_inputs = split._move_inputs

    def recorded(device: torch.device, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        moved_to[module] = device
        return move_inputs(device, module, args, kwargs)

    monkeypatch.setattr(split, "_move_inputs", recorded)
    # Distinct device objects that are all the CPU: the bookkeeping is that of real GPUs.
    devices = [torch.device("cpu", index) for index in range(num_devices)]
    prior = load_prior(sd3_dir, devices)
    transformer = prior.transformer
    embedders = (transformer.pos_embed, transformer.time_text_embed, transformer.context_embedder)
    # Balanced by what each part holds while adapting: trainable blocks four times over.
    starts = balance_blocks(
        [training_bytes(block) for block in transformer.transformer_blocks],
        num_devices,
        first_extra=module_bytes(prior.vae) + prior.prompts.nbytes + sum(map(training_bytes, embedders)),
        last_extra=training_bytes(transformer.norm_out) + training_bytes(transformer.proj_out),
    )
    # The tiny VAE outweighs all blocks: the first device keeps only the one block it must have.
    assert starts[:2] == [0, 1]
    assert prior.block_devices == [devices[sum(index >= start for start in starts) - 1] for index in range(4)]

    for got, expected in zip(velocity_and_gradients(prior), reference):
        torch.testing.assert_close(got, expected)
    assert moved_to[transformer.norm_out] == moved_to[transformer.proj_out] == devices[-1]  # the outputs, on the last
    assert [moved_to[block] for block in transformer.transformer_blocks] == prior.block_devices
    explicit = load_prior(sd3_dir, devices[:2], split=[0, 2])
    assert explicit.block_devices == [devices[0]] * 2 + [devices[1]] * 2


@pytest.mark.parametrize(("setting", "recomputed"), [(True, [2, 2, 2, 2]), (3, [2, 2, 2, 1])])
def test_gradient_checkpointing_gives_the_same_gradients(sd3_dir: Path, setting: bool | int, recomputed: list[int]) -> None:
    reference = velocity_and_gradients(load_prior(sd3_dir))
    devices = [torch.device("cpu", index) for index in range(2)]
    prior = load_prior(sd3_dir, devices, gradient_checkpointing=setting)
    blocks = prior.transformer.transformer_blocks
    calls = [0] * len(blocks)
    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    for got, expected in zip(velocity_and_gradients(prior), reference):
        torch.testing.assert_close(got, expected)
    assert calls == recomputed  # the checkpointed blocks run again in backward, across the split too


def test_compiled_blocks_compile_once_whatever_the_number_of_classes(sd3_dir: Path) -> None:
    from dusa_cli.bench.timing import compiled_graphs

    prior = load_prior(sd3_dir, gradient_checkpointing=True)
    for block in prior.transformer.transformer_blocks:
        block.compile(backend="aot_eager")  # as Inductor compiles, without its code generation
    generator = torch.Generator().manual_seed(0)

    def predict(classes: list[int]) -> None:
        latents = torch.randn(len(classes), 16, LATENT_SIZE, LATENT_SIZE, generator=generator)
        prior.predict(latents, torch.rand(len(classes), generator=generator), torch.tensor(classes)).sum().backward()

    before = compiled_graphs()
    predict([0, 1, 2])
    first_window = compiled_graphs() - before
    for classes in ([3, 1], [0, 1, 2, 3], [2, 0]):  # windows with other numbers of classes
        predict(classes)
    assert compiled_graphs() - before == first_window > 0


def test_train_keeps_the_prior_in_eval_mode(sd3_dir: Path) -> None:
    prior = load_prior(sd3_dir)
    prior.train()
    assert not any(module.training for module in prior.modules())


def test_training_bytes_count_adam_state_for_trainable_parameters_only() -> None:
    layer = torch.nn.Linear(4, 4)  # 20 fp32 parameters = 80 bytes
    norm = torch.nn.BatchNorm1d(4)  # 8 parameters + running stats and counter as buffers
    assert training_bytes(layer) == 4 * 80
    layer.requires_grad_(False)
    assert training_bytes(layer) == 80
    buffers = sum(b.nbytes for b in norm.buffers())
    assert training_bytes(norm) == 4 * 32 + buffers
