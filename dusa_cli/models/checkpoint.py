"""Read local weight files and load them strictly, with a readable report when they do not fit."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from dusa_cli.errors import DusaError, listed

# Wrapper keys used by common training codes, in the order a user most likely wants them:
# EMA weights first (released DiT/SiT/ConvNeXt checkpoints ship both), then the plain model.
WRAPPER_KEYS = ("ema", "model_ema", "state_dict_ema", "state_dict", "model", "module", "net")
PREFIXES = ("module.", "model.", "_orig_mod.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat name → tensor dict from .safetensors or a torch pickle, wrappers removed."""
    path = Path(path)
    if path.is_dir():
        raise DusaError(f"checkpoint {path} is a folder: name the weights file in it (.pth, .pt or .safetensors)")
    if not path.is_file():
        raise DusaError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any decoder failure means the file is not usable weights
        reason = error if path.suffix == ".safetensors" or _torch_format(path) else "not a torch or safetensors file"
        raise DusaError(f"cannot read checkpoint {path}: {reason}") from error
    while isinstance(state, Mapping) and not _is_flat(state):
        inner = next((state[key] for key in WRAPPER_KEYS if isinstance(state.get(key), Mapping)), None)
        if inner is None:
            raise DusaError(
                f"checkpoint {path} holds no state dict (top-level keys: {', '.join(list(state)[:8])})"
            )
        state = inner
    if not isinstance(state, Mapping):
        raise DusaError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return _strip_prefixes({str(k): v for k, v in state.items()})


def _torch_format(path: Path) -> bool:
    """A zip archive (torch.save) or a pickle (legacy torch.save); other files fail in the
    unpickler with messages about its internals ("list index out of range")."""
    with path.open("rb") as stream:
        pickled = stream.read(1) == b"\x80"  # a pickle's protocol opcode
    return pickled or zipfile.is_zipfile(path)


def _is_flat(state: Mapping) -> bool:
    return bool(state) and all(isinstance(value, torch.Tensor) for value in state.values())


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, target: str | None = None) -> None:
    """Load every tensor or fail with one line naming the keys missing from the file, those not in
    the model and those of another shape; `target` names the model (default: its class)."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshaped = [
        f"{key} {tuple(state[key].shape)} in the file, {tuple(expected[key].shape)} in the model"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    problems = [
        f"{what}: {listed(keys)}"
        for what, keys in (("missing from the file", missing), ("not in the model", unexpected), ("another shape", misshaped))
        if keys
    ]
    if problems:
        raise DusaError(f"{source} does not fit {target or type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)
