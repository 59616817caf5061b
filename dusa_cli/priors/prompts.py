"""Text conditioning for Stable Diffusion 3: the prompts' CLIP-L, CLIP-G (and optionally T5)
states, encoded once, cached on disk, and laid out per class exactly as the diffusers SD3
pipeline's `encode_prompt` does (docs/research/peers.md §D)."""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dusa_cli.errors import DusaError
from dusa_cli.writing import write_atomic

CLIP_LENGTH = 77  # CLIP's context length; the pipeline pads and truncates both CLIPs to it
CLIP_FOLDERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
T5_FOLDERS = ("text_encoder_3", "tokenizer_3")
ENCODE_BATCH = 16


class PromptEmbeddings(nn.Module):
    """One row per prompt: `clip` (N, 77, clip_dim) = both CLIPs' penultimate hidden states
    concatenated on channels, `pooled` (N, pooled_dim) = both CLIPs' projected pooled outputs,
    `t5` (N, L, joint_dim) or None when T5 is not used."""

    def __init__(self, clip: torch.Tensor, pooled: torch.Tensor, t5: torch.Tensor | None = None):
        super().__init__()
        # Non-persistent: derived data (cached on disk by load_prompt_embeddings) that must not
        # swell state_dict snapshots; as buffers they still follow `.to(device)`.
        self.register_buffer("clip", clip, persistent=False)
        self.register_buffer("pooled", pooled, persistent=False)
        self.register_buffer("t5", t5, persistent=False)

    def __len__(self) -> int:
        return self.clip.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.buffers())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: tensor for name, tensor in self.named_buffers()}

    def conditioning(
        self, classes: torch.Tensor, joint_dim: int, t5_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder_hidden_states (K, 77 + t5_length, joint_dim), pooled (K, pooled_dim)) for the
        prompts `classes` (K,): the CLIP states zero-padded on channels to joint_dim, followed along
        the sequence by the T5 states, or by zeros where T5 is not used (the pipeline's rule when
        `text_encoder_3` is None). Built for the K selected prompts only."""
        classes = classes.to(self.clip.device)
        clip = self.clip[classes]
        if clip.shape[-1] > joint_dim:
            raise DusaError(f"CLIP states have {clip.shape[-1]} channels, more than the transformer's {joint_dim}")
        clip = F.pad(clip, (0, joint_dim - clip.shape[-1]))
        if self.t5 is None:
            t5 = clip.new_zeros(len(classes), t5_length, joint_dim)
        elif self.t5.shape[1:] != (t5_length, joint_dim):
            raise DusaError(
                f"T5 states are {tuple(self.t5.shape[1:])} (tokens, channels) but the transformer "
                f"wants ({t5_length}, {joint_dim})"
            )
        else:
            t5 = self.t5[classes]
        return torch.cat([clip, t5], dim=1), self.pooled[classes]


def _required_folder(model_dir: Path, name: str, optional_t5: bool = False) -> Path:
    folder = model_dir / name
    if not folder.is_dir():
        hint = " (T5 is optional: turn use_t5 off to replace its states by zeros)" if optional_t5 else ""
        raise DusaError(f"SD3 folder {folder} is missing{hint}")
    return folder


def _used_folders(model_dir: Path, use_t5: bool) -> list[Path]:
    names = [name for pair in CLIP_FOLDERS for name in pair]
    folders = [_required_folder(model_dir, name) for name in names]
    if use_t5:
        folders += [_required_folder(model_dir, name, optional_t5=True) for name in T5_FOLDERS]
    return folders


@torch.no_grad()
def encode_prompts(
    model_dir: Path,
    prompts: list[str],
    *,
    use_t5: bool,
    max_sequence_length: int = 256,
    device: torch.device | str = "cpu",
    t5_dtype: torch.dtype | None = None,
) -> PromptEmbeddings:
    """Run SD3's text encoders over `prompts` (batches of ENCODE_BATCH) and free them. The CLIPs
    run in fp32; T5 in `t5_dtype` (default: `default_t5_dtype(device)`); states are kept in fp32."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    model_dir = Path(model_dir)
    _used_folders(model_dir, use_t5)  # every folder checked before the slow loading starts

    def load(loader: type, folder: str) -> Any:
        try:
            return loader.from_pretrained(model_dir / folder, local_files_only=True)
        except Exception as error:  # OSError, ValueError, SafetensorError, …: whatever the files' fault
            raise DusaError(f"cannot load {model_dir / folder}: {error}".replace("\n", " ")) from error

    def encoder(model_class: type, folder: str, dtype: torch.dtype = torch.float32) -> nn.Module:
        # The released encoders are stored in fp16; embeddings are computed once, in `dtype`.
        return load(model_class, folder).to(device=device, dtype=dtype).eval()

    def tokenize(tokenizer_class: type, folder: str, length: int) -> torch.Tensor:
        tokens = load(tokenizer_class, folder)(
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        return tokens.input_ids.to(device)

    clip_states, pooled = [], []
    for encoder_folder, tokenizer_folder in CLIP_FOLDERS:
        ids = tokenize(CLIPTokenizer, tokenizer_folder, CLIP_LENGTH)
        clip = encoder(CLIPTextModelWithProjection, encoder_folder)
        outputs = [clip(batch, output_hidden_states=True) for batch in ids.split(ENCODE_BATCH)]
        clip_states.append(torch.cat([output.hidden_states[-2] for output in outputs]))
        pooled.append(torch.cat([output.text_embeds for output in outputs]))
        del clip, outputs

    t5 = None
    if use_t5:
        ids = tokenize(T5TokenizerFast, T5_FOLDERS[1], max_sequence_length)
        t5_encoder = encoder(T5EncoderModel, T5_FOLDERS[0], t5_dtype or default_t5_dtype(device))
        # No attention mask, as the pipeline: padding tokens are encoded like the rest.
        t5 = torch.cat([t5_encoder(batch).last_hidden_state.float() for batch in ids.split(ENCODE_BATCH)])
        del t5_encoder

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return PromptEmbeddings(torch.cat(clip_states, dim=-1), torch.cat(pooled, dim=-1), t5)


def default_t5_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on a GPU: T5-XXL (4.7 B parameters) needs 19 GB in fp32 but 9.5 GB in bf16, the
    precision it was trained in (fp16 overflows in T5); fp32 on a CPU, where bf16 is slow."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _file_identity(path: Path) -> list[str | int]:
    status = path.stat()  # of the target, like resolve(), where the file is a symlink (hub cache)
    return [str(path.resolve()), status.st_size, status.st_mtime_ns]


def _cache_key(
    model_dir: Path, prompts: list[str], use_t5: bool, max_sequence_length: int, device: torch.device | str
) -> str:
    """Everything the embeddings depend on. The text encoders and tokenizers are identified
    without reading their weights (gigabytes: a hit must cost no more than a stat per file) by
    their configs and, for each file, its absolute path with symlinks resolved, size and
    modification time. So another SD3 folder, a copy or a file rewritten in place misses and is
    encoded afresh; only a file changed while keeping its path, size and st_mtime_ns (its time
    set back, e.g. by `touch -d` or `cp -p`) would be served stale embeddings."""
    folders = {}
    for folder in _used_folders(model_dir, use_t5):
        files = sorted(path for path in folder.rglob("*") if path.is_file())
        config = folder / "config.json"
        folders[folder.name] = {
            "config": config.read_text() if config.is_file() else None,
            "files": [_file_identity(path) for path in files],
        }
    identity = {"prompts": prompts, "use_t5": use_t5, "max_sequence_length": max_sequence_length, "folders": folders}
    if use_t5:  # embeddings from a bf16 T5 are a different cache entry from fp32 ones
        identity["t5_dtype"] = str(default_t5_dtype(device))
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def load_prompt_embeddings(
    model_dir: Path,
    prompts: list[str],
    *,
    use_t5: bool,
    max_sequence_length: int = 256,
    cache_dir: Path | None = None,
    device: torch.device | str = "cpu",
) -> PromptEmbeddings:
    """encode_prompts, through a cache file `cache_dir/prompts-<key>.safetensors` (no cache when
    cache_dir is None)."""
    from safetensors.torch import load_file, save

    model_dir = Path(model_dir)
    if cache_dir is None:
        return encode_prompts(model_dir, prompts, use_t5=use_t5, max_sequence_length=max_sequence_length, device=device)
    path = Path(cache_dir) / f"prompts-{_cache_key(model_dir, prompts, use_t5, max_sequence_length, device)[:32]}.safetensors"
    if path.is_file():
        try:
            tensors = load_file(path)  # to the CPU: safetensors rejects some device names torch accepts
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise DusaError(f"cannot read the prompt cache {path} (delete it to re-encode): {error}") from error
        return PromptEmbeddings(tensors["clip"], tensors["pooled"], tensors.get("t5")).to(device)
    embeddings = encode_prompts(model_dir, prompts, use_t5=use_t5, max_sequence_length=max_sequence_length, device=device)
    data = save({name: tensor.cpu().contiguous() for name, tensor in embeddings.tensors().items()})
    write_atomic(path, lambda stream: stream.write(data))
    return embeddings
