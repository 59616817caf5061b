"""Generative priors: checkpoint layout of the released families, strict loading, noise paths,
time embedding, encoders, and the guarantees TTA relies on (no label dropout, frozen parts,
gradient checkpointing)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import randomized

import dusa_cli._compat  # noqa: F401  (torchvision shim before timm/diffusers)
from dusa_cli.errors import ConfigError, DusaError
from dusa_cli.priors import (
    DDPMPath,
    LinearFlowPath,
    available_priors,
    create_prior,
    create_prior_transformer,
    load_vae,
)
from dusa_cli.priors.checkpointing import checkpointed_blocks
from dusa_cli.priors.registry import get_preset
from dusa_cli.priors.transformer import DiffusionTransformer, timestep_embedding
from dusa_cli.priors.vae import SD_VAE_CONFIG, TINY_VAE_CONFIG


def flat_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


# --- released layouts, written out from docs/research/peers.md §C and dusa_official.md §1.2 -------------


def expected_xl_layout(out_channels: int, projector_dim: int | None) -> dict[str, tuple[int, ...]]:
    hidden, tokens, patch = 1152, 256, 2
    layout = {
        "x_embedder.proj.weight": (hidden, 4, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "pos_embed": (1, tokens, hidden),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (1001, hidden),
        "final_layer.linear.weight": (patch * patch * out_channels, hidden),
        "final_layer.linear.bias": (patch * patch * out_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for block in range(28):
        for name, (rows, cols) in {
            "attn.qkv": (3 * hidden, hidden),
            "attn.proj": (hidden, hidden),
            "mlp.fc1": (4 * hidden, hidden),
            "mlp.fc2": (hidden, 4 * hidden),
            "adaLN_modulation.1": (6 * hidden, hidden),
        }.items():
            layout[f"blocks.{block}.{name}.weight"] = (rows, cols)
            layout[f"blocks.{block}.{name}.bias"] = (rows,)
    if projector_dim is not None:
        for index, (rows, cols) in {0: (2048, hidden), 2: (2048, 2048), 4: (projector_dim, 2048)}.items():
            layout[f"projectors.0.{index}.weight"] = (rows, cols)
            layout[f"projectors.0.{index}.bias"] = (rows,)
    return layout


@pytest.mark.parametrize(
    ("name", "out_channels", "projector_dim"),
    [("dit_xl_2_256", 8, None), ("sit_xl_2", 4, 768)],
)
def test_released_layouts(name: str, out_channels: int, projector_dim: int | None) -> None:
    with torch.device("meta"):
        model = create_prior_transformer(name)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes == expected_xl_layout(out_channels, projector_dim)


def test_dit_xl_parameter_count() -> None:
    with torch.device("meta"):
        model = create_prior_transformer("dit_xl_2_256")
    total = sum(math.prod(shape) for shape in expected_xl_layout(8, None).values())
    assert sum(p.numel() for p in model.parameters()) == total == 675_129_632  # DiT paper: 675 M


def test_all_presets_build_and_run() -> None:
    for name in ("sit_tiny", "dit_tiny", "sit_digits"):
        model = create_prior_transformer(name).eval()
        size, channels = model.config.input_size, model.config.in_channels
        out = model(torch.randn(2, channels, size, size), torch.tensor([0.5, 0.1]), y=torch.tensor([0, 9]))
        assert out.shape == (2, model.config.out_channels, size, size)
    assert {"sit_xl_2", "sit_l_2", "sit_b_2", "sit_s_2", "dit_xl_2_256", "sit_digits"} <= set(available_priors())


def test_dits_init_sets_every_parameter_of_a_model_built_without_one() -> None:
    # create_prior_transformer builds on the meta device and empties the model onto the CPU: the
    # layers' default init never runs, so DiT's own must leave no tensor as the memory it got.
    with torch.device("meta"):
        model = DiffusionTransformer(create_prior_transformer("sit_tiny", qk_norm=True).config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    model.initialize_weights()
    assert not any(parameter.isnan().any() for parameter in model.parameters())
    built = create_prior_transformer("sit_tiny", qk_norm=True)
    for made in (model, built):
        block = made.blocks[0]
        assert torch.equal(block.attn.q_norm.weight, torch.ones(16)) and not block.attn.k_norm.bias.any()
        assert not block.adaLN_modulation[1].weight.any() and not made.final_layer.linear.weight.any()  # adaLN-Zero
        bound = math.sqrt(6 / sum(block.mlp.fc1.weight.shape))  # Xavier-uniform's
        assert block.mlp.fc1.weight.abs().max() <= bound < 4 * block.mlp.fc1.weight.std()
    assert torch.equal(built.pos_embed, model.pos_embed)  # the fixed sin-cos table


def test_unknown_prior_and_bad_override_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown prior 'sit_xxl'.*sit_xl_2"):
        create_prior_transformer("sit_xxl")
    with pytest.raises(ConfigError, match="unknown prior 'sit_digit', did you mean 'sit_digits'"):
        create_prior_transformer("sit_digit")
    with pytest.raises(ConfigError, match="hidden_sise: unknown key, did you mean 'hidden_size'"):
        create_prior_transformer("sit_tiny", hidden_sise=64)
    with pytest.raises(ConfigError, match="not a multiple of num_heads"):
        create_prior_transformer("sit_tiny", hidden_size=36, num_heads=8)


# --- checkpoints --------------------------------------------------------------------------------


def test_strict_loading_flat_and_wrapped(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    ema = flat_state(randomized(create_prior_transformer("sit_tiny"), seed=1))
    raw = flat_state(randomized(create_prior_transformer("sit_tiny"), seed=2))
    save_file(ema, tmp_path / "flat.safetensors")
    torch.save({"model": raw, "ema": ema, "steps": 4}, tmp_path / "wrapped.pt")
    for file in ("flat.safetensors", "wrapped.pt"):
        loaded = create_prior_transformer("sit_tiny", tmp_path / file).state_dict()
        assert loaded.keys() == ema.keys()
        assert all(torch.equal(loaded[key], ema[key]) for key in ema), file  # EMA wins over model


def test_mismatched_checkpoint_names_the_difference(tmp_path: Path) -> None:
    file = tmp_path / "dit.pt"
    torch.save(flat_state(create_prior_transformer("dit_tiny")), file)
    with pytest.raises(DusaError) as caught:
        create_prior_transformer("sit_tiny", file)
    message = str(caught.value)
    assert "\n" not in message
    assert f"checkpoint {file} does not fit sit_tiny" in message
    assert "out_channels 8 in the file vs 4" in message
    assert "projector_dims () in the file vs (16,)" in message
    assert message.endswith("(the file fits dit_tiny)")

    wider = tmp_path / "wide.pt"
    torch.save(flat_state(create_prior_transformer("sit_tiny", hidden_size=64)), wider)
    with pytest.raises(DusaError, match="hidden_size 64 in the file vs 32") as caught:
        create_prior_transformer("sit_tiny", wider)
    assert "fits" not in str(caught.value)  # no preset has hidden 64

    # Same architecture numbers, keys missing or extra: the key-level report, naming the preset.
    state = flat_state(create_prior_transformer("sit_tiny"))
    for block in range(2):
        del state[f"blocks.{block}.mlp.fc1.bias"], state[f"blocks.{block}.mlp.fc2.bias"]
    del state["final_layer.linear.bias"]
    state["final_layer.extra"] = torch.zeros(1)
    torch.save(state, file)
    with pytest.raises(DusaError) as caught:
        create_prior_transformer("sit_tiny", file)
    assert str(caught.value) == (
        f"checkpoint {file} does not fit sit_tiny: missing from the file: blocks.0.mlp.fc1.bias, blocks.0.mlp.fc2.bias, "
        "blocks.1.mlp.fc1.bias, blocks.1.mlp.fc2.bias and 1 more; not in the model: final_layer.extra"
    )
    state = flat_state(create_prior_transformer("sit_tiny"))
    state["final_layer.linear.bias"] = state["final_layer.linear.bias"][:2]
    torch.save(state, file)
    with pytest.raises(DusaError, match=r"does not fit sit_tiny: another shape: final_layer\.linear\.bias \(2,\) in the file, \(\d+,\) in the model$"):
        create_prior_transformer("sit_tiny", file)


# --- noise paths ----------------------------------------------------------------------------------


def test_ddpm_path() -> None:
    path = DDPMPath()
    assert path.alpha_bar(100).item() == pytest.approx(0.8951, abs=1e-4)  # dusa_official.md §1.2
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # float64 tables, used as float32 (ADM)
    assert path.alpha_bar(999).item() == pytest.approx(torch.prod(1 - betas).item(), rel=1e-6)

    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    x_t = path.add_noise(x0, noise, torch.tensor([100, 500]))
    for i, step in enumerate((100, 500)):
        alpha_bar = path.alpha_bar(step).item()
        expected = math.sqrt(alpha_bar) * x0[i] + math.sqrt(1 - alpha_bar) * noise[i]
        torch.testing.assert_close(x_t[i], expected)
    torch.testing.assert_close(path.add_noise(x0, noise, 100), 0.9461 * x0 + 0.3239 * noise, atol=1e-3, rtol=0)
    assert torch.equal(path.target(x0, noise), noise)
    assert path.model_time(torch.tensor([100])).dtype == torch.float32
    assert path.model_time(100).item() == 100.0
    assert path.default_timestep == 100
    # A fractional draw from [100, 101) is step 100 for both the noise level and the model time.
    torch.testing.assert_close(path.add_noise(x0, noise, 100.7), path.add_noise(x0, noise, 100))
    assert path.model_time(torch.tensor([100.7])).item() == 100.0
    path.check_time(100)
    for bad in (1000, 0.5, -1):
        with pytest.raises(ConfigError, match="ddpm timestep"):
            path.check_time(bad)


def test_linear_flow_path() -> None:
    path = LinearFlowPath()
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(path.add_noise(x0, noise, 0.0), x0)
    torch.testing.assert_close(path.add_noise(x0, noise, 1.0), noise)
    x_t = path.add_noise(x0, noise, torch.tensor([0.0, 0.25, 1.0]))
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(x_t[2], noise[2])
    assert torch.equal(path.target(x0, noise), noise - x0)
    assert path.model_time(0.3).item() == pytest.approx(0.3)
    # The default matches DDPM t=100's signal-to-noise ratio (dusa_official.md §1.2).
    ddpm_ratio = math.sqrt(1 - DDPMPath().alpha_bar(100).item()) / math.sqrt(DDPMPath().alpha_bar(100).item())
    t = path.default_timestep
    assert t / (1 - t) == pytest.approx(ddpm_ratio, abs=0.01)
    path.check_time(1.0)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        path.check_time(100)


# --- transformer details ---------------------------------------------------------------------------


@pytest.mark.parametrize("t", [100.0, 0.3])
def test_timestep_embedding_by_hand(t: float) -> None:
    embedding = timestep_embedding(torch.tensor([t]))[0]
    assert embedding.shape == (256,)
    for i in (0, 1, 64, 127):
        frequency = 10_000 ** (-i / 128)
        assert embedding[i].item() == pytest.approx(math.cos(t * frequency), abs=1e-5)
        assert embedding[128 + i].item() == pytest.approx(math.sin(t * frequency), abs=1e-5)


def test_pos_embed_is_fixed_2d_sincos() -> None:
    model = create_prior_transformer("sit_tiny")  # hidden 32 → 8 frequencies per axis, 4×4 grid
    table = model.pos_embed[0]
    assert not model.pos_embed.requires_grad
    omega = torch.tensor([10_000 ** (-k / 8) for k in range(8)])
    row, col = 1, 2  # token 1·4 + 2, tokens row-major; first half encodes the column
    expected = torch.cat(
        [torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)]
    )
    torch.testing.assert_close(table[row * 4 + col], expected)


def test_unpatchify_inverts_the_patch_layout() -> None:
    model = create_prior_transformer("dit_tiny")  # 8×8 input, patch 2, 8 output channels
    image = torch.randn(2, 8, 8, 8)
    tokens = image.reshape(2, 8, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 32)  # (p, q, c)
    assert torch.equal(model.unpatchify(tokens), image)


def test_fresh_model_starts_at_zero_output() -> None:
    model = create_prior_transformer("sit_tiny")  # adaLN-Zero: zeroed final layer
    assert torch.equal(model(torch.randn(1, 4, 8, 8), 0.5, y=torch.tensor([3])), torch.zeros(1, 4, 8, 8))


# --- the prior as TTA uses it ----------------------------------------------------------------------


def test_predict_takes_the_first_in_channels() -> None:
    prior = create_prior("dit_tiny", vae="none", in_channels=3)
    randomized(prior.transformer)
    x_t, embedding = torch.randn(2, 3, 8, 8), prior.class_embeddings(torch.tensor([1, 2]))
    full = prior.transformer(x_t, torch.tensor([100.0, 100.0]), class_embedding=embedding)
    assert full.shape[1] == 6
    prediction = prior.predict(x_t, torch.tensor([100, 100]), embedding)
    assert torch.equal(prediction, full[:, :3])


@pytest.mark.parametrize("name", ["sit_tiny", "dit_tiny"])
def test_no_label_dropout_even_in_train_mode(name: str) -> None:
    prior = create_prior(name, vae="none", in_channels=3)
    randomized(prior.transformer)
    prior.train()
    assert not prior.training and not prior.transformer.training
    x_t, labels = torch.randn(16, 3, 8, 8), torch.arange(16) % 10
    embedding = prior.class_embeddings(labels)
    t = prior.path.default_timestep
    outputs = [prior.predict(x_t, t, embedding) for _ in range(2)]
    prior.transformer.train(True)  # even a transformer forced into train mode never drops labels
    outputs += [prior.transformer(x_t, prior.path.model_time(t), y=labels)[:, :3] for _ in range(2)]
    for output in outputs[1:]:
        assert torch.equal(output, outputs[0])


def test_class_embeddings_and_null_class() -> None:
    prior = create_prior("sit_digits")
    assert prior.num_classes == 10 and prior.null_class == 10
    table = prior.transformer.y_embedder.embedding_table.weight
    assert table.shape == (11, 128)
    labels = torch.tensor([[0, 10], [3, 4]])
    embeddings = prior.class_embeddings(labels)
    assert embeddings.shape == (2, 2, 128) and not embeddings.requires_grad
    assert torch.equal(embeddings[0, 1], table[10])
    with pytest.raises(ConfigError, match="no null class"):
        create_prior("sit_digits", class_dropout_prob=0.0).null_class


def test_trainable_parameters_and_gradients() -> None:
    prior = create_prior("sit_tiny", vae="none", in_channels=3)
    randomized(prior.transformer)
    names = {id(p): n for n, p in prior.transformer.named_parameters()}
    trainable = {names[id(p)] for p in prior.trainable_parameters()}
    assert not any(n.startswith(("y_embedder", "projectors", "pos_embed")) for n in trainable)
    assert {"x_embedder.proj.weight", "t_embedder.mlp.0.weight", "blocks.1.attn.qkv.weight"} <= trainable
    assert {"final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"} <= trainable
    assert len(trainable) == len(names) - 1 - 1 - 6  # label table, pos_embed, 3 projector linears
    frozen = [p for n, p in prior.transformer.named_parameters() if n not in trainable]
    assert not any(p.requires_grad for p in frozen)

    x0, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    x_t = prior.path.add_noise(x0, noise, 0.5)
    weights = torch.tensor([0.3, 0.7], requires_grad=True)  # a classifier's mixture weights
    predictions = prior.predict(x_t.repeat(2, 1, 1, 1), 0.5, prior.class_embeddings(torch.tensor([1, 1, 2, 2])))
    mixture = weights[0] * predictions[:2] + weights[1] * predictions[2:]
    F.mse_loss(mixture, prior.path.target(x0, noise)).backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "blocks.0.adaLN_modulation.1.weight"):
        assert prior.transformer.get_parameter(name).grad.abs().sum() > 0, name
    assert all(p.grad is None for p in frozen)


@pytest.mark.parametrize(("setting", "recomputed"), [(True, [2, 2]), (1, [2, 1])])
def test_gradient_checkpointing_matches(setting: bool | int, recomputed: list[int]) -> None:
    plain = randomized(create_prior_transformer("dit_tiny"))
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointed_blocks = checkpointed_blocks(setting, len(checkpointed.blocks))
    calls = [0] * len(checkpointed.blocks)
    for index, block in enumerate(checkpointed.blocks):
        block.register_forward_pre_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 100, 900]), torch.tensor([0, 5, 10])
    outputs = []
    for model in (plain, checkpointed):
        out = model(x, t.float(), y=y)
        out.square().mean().backward()
        outputs.append(out)
    assert calls == recomputed  # a checkpointed block runs again in backward, the others once
    torch.testing.assert_close(outputs[0], outputs[1])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


# --- encoders ---------------------------------------------------------------------------------------


def test_create_prior_picks_the_preset_path() -> None:
    assert isinstance(create_prior("sit_digits").path, LinearFlowPath)
    assert isinstance(create_prior("dit_tiny", in_channels=3).path, DDPMPath)
    assert isinstance(create_prior("sit_digits", path="ddpm").path, DDPMPath)
    with pytest.raises(ConfigError, match="unknown noise path 'cosine'"):
        create_prior("sit_digits", path="cosine")
    # The paper-sized presets: DUSA's DiT-XL/2 on DDPM (§1.2), REPA's SiTs on the linear flow
    # (peers.md §C), at the family's (hidden size, depth, heads) (DiT paper, Table 1).
    presets = {name: get_preset(name) for name in ("dit_xl_2_256", "sit_xl_2", "sit_l_2", "sit_b_2", "sit_s_2")}
    assert {name: (p.path, p.config.hidden_size, p.config.depth, p.config.num_heads) for name, p in presets.items()} == {
        "dit_xl_2_256": ("ddpm", 1152, 28, 16), "sit_xl_2": ("linear", 1152, 28, 16), "sit_l_2": ("linear", 1024, 24, 16),
        "sit_b_2": ("linear", 768, 12, 12), "sit_s_2": ("linear", 384, 12, 6),
    }


def test_pixel_space_encode() -> None:
    prior = create_prior("sit_digits")  # 32-px pixel-space prior
    assert prior.pixel_size == 32
    images = torch.rand(2, 3, 28, 28)
    z0 = prior.encode(images)
    assert z0.shape == (2, 3, 32, 32)
    expected = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=True) * 2 - 1
    torch.testing.assert_close(z0, expected)
    assert torch.equal(prior.encode(torch.ones(1, 3, 32, 32)), torch.ones(1, 3, 32, 32))
    assert torch.equal(prior.encode(torch.zeros(1, 3, 32, 32)), -torch.ones(1, 3, 32, 32))


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-vae")
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(root / "vae")
    return root


@pytest.mark.parametrize("subdir", ["vae", "."])  # a VAE folder, or a pipeline folder holding vae/
def test_vae_encode(tiny_vae_dir: Path, subdir: str) -> None:
    from diffusers import AutoencoderKL

    prior = create_prior("sit_tiny", vae=tiny_vae_dir / subdir)  # 8×8 latents, 2× VAE → 16 px
    assert prior.pixel_size == 16
    images = torch.rand(2, 3, 20, 20, requires_grad=True)
    z0 = prior.encode(images)
    assert z0.shape == (2, 4, 8, 8) and not z0.requires_grad
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir / "vae")
    with torch.no_grad():
        resized = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=True)
        expected = vae.encode(resized * 2 - 1).latent_dist.mean * 0.18215
    torch.testing.assert_close(z0, expected)
    assert not any(p.requires_grad for p in prior.encoder.parameters())
    kept = sum(p.numel() for p in prior.encoder.parameters())  # only encoding is needed: no decoder
    assert kept == sum(p.numel() for p in [*vae.encoder.parameters(), *vae.quant_conv.parameters()])


def test_vae_weights_file(tmp_path: Path, tiny_vae_dir: Path) -> None:
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    full = tmp_path / "sd-vae.safetensors"
    save_file({k: v.half() for k, v in AutoencoderKL(**SD_VAE_CONFIG).state_dict().items()}, full)
    encoder = load_vae(full)
    assert (encoder.channels, encoder.downsample) == (4, 8)

    tiny = tmp_path / "tiny.safetensors"
    save_file(AutoencoderKL.from_pretrained(tiny_vae_dir / "vae").state_dict(), tiny)
    with pytest.raises(DusaError, match=f"VAE weights {tiny}.*does not fit") as caught:
        create_prior("sit_tiny", vae=tiny)
    assert "\n" not in str(caught.value)


def test_vae_errors(tmp_path: Path) -> None:
    with pytest.raises(DusaError, match="no such path"):
        create_prior("sit_tiny", vae=tmp_path / "missing")
    with pytest.raises(DusaError, match="cannot load the VAE directory"):
        create_prior("sit_tiny", vae=tmp_path)
    with pytest.raises(ConfigError, match="prior sit_tiny models 4-channel inputs but vae 'none' gives 3"):
        create_prior("sit_tiny")


def test_packaged_weights_location() -> None:
    from dusa_cli.priors.registry import packaged_weights

    assert packaged_weights("sit_digits") == Path(dusa_cli.__file__).parent / "assets" / "sit_digits.safetensors"
    with pytest.raises(ConfigError, match="prior sit_xl_2 ships no weights"):
        packaged_weights("sit_xl_2")
