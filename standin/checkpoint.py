"""Stand-In adapter files: the official .ckpt, the community safetensors, and ours (SPEC section 7).

All three hold the same 240 tensors (for 40 blocks) under the official names; the community file prefixes them
with "diffusion_model.", ours adds metadata. Pickles are read with weights_only=True: no code is executed.
"""

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from standin.io import atomic_write
from standin.models.adapter import StandInAdapter

COMMUNITY_PREFIX = "diffusion_model."
KEY_PATTERN = re.compile(r"^blocks\.(\d+)\.self_attn\.([qkv])_loras\.(down|up)\.weight$")
FORMAT_NAME = "standin-adapter"
FORMAT_VERSION = "1"

# Known Wan base widths, to name the base an adapter belongs to in error messages.
BASE_NAMES = {5120: "Wan2.1-T2V-14B / Wan2.2-A14B (dim 5120)", 1536: "Wan2.1-T2V-1.3B (dim 1536)"}


class AdapterFileError(ValueError):
    """The adapter file cannot be read, or does not fit the base model."""


def _base_name(dim: int) -> str:
    return BASE_NAMES.get(dim, f"a base of width {dim}")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of an adapter file under the official key names, whatever its format."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state_dict = load_file(str(path))
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError) as error:
        raise AdapterFileError(f"cannot read adapter file {path}: {error}") from error
    except Exception as error:  # the weights-only unpickler refuses anything but plain tensors and containers
        raise AdapterFileError(f"{path} is not a plain tensor checkpoint (refused to unpickle it): {error}") from error
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise AdapterFileError(f"{path} does not hold a flat dict of tensors")
    if state_dict and all(key.startswith(COMMUNITY_PREFIX) for key in state_dict):
        state_dict = {key[len(COMMUNITY_PREFIX) :]: value for key, value in state_dict.items()}
    return state_dict


def validate_state_dict(state_dict: dict[str, torch.Tensor], dim: int, num_layers: int) -> int:
    """Check the tensors against a base of width `dim` with `num_layers` blocks; return the LoRA rank."""
    unexpected = sorted(key for key in state_dict if not KEY_PATTERN.match(key))
    if unexpected:
        raise AdapterFileError(
            f"not a Stand-In adapter: {len(unexpected)} unexpected keys, e.g. {unexpected[:3]} "
            "(expected blocks.N.self_attn.{q,k,v}_loras.{down,up}.weight)"
        )
    down = state_dict.get("blocks.0.self_attn.q_loras.down.weight")
    if down is None or down.ndim != 2:
        raise AdapterFileError("adapter has no 2-D blocks.0.self_attn.q_loras.down.weight")
    rank, file_dim = down.shape
    if file_dim != dim:
        raise AdapterFileError(
            f"adapter was made for {_base_name(file_dim)}, but the base model is {_base_name(dim)}"
        )
    file_layers = 1 + max(int(KEY_PATTERN.match(key).group(1)) for key in state_dict)
    if file_layers != num_layers:
        raise AdapterFileError(f"adapter has {file_layers} blocks, but the base model has {num_layers}")
    expected = StandInAdapter(dim, num_layers, rank).to("meta").state_dict()
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise AdapterFileError(f"adapter is incomplete: {len(missing)} missing keys, e.g. {missing[:3]}")
    for key, reference in expected.items():
        if state_dict[key].shape != reference.shape:
            raise AdapterFileError(
                f"{key} has shape {list(state_dict[key].shape)}, expected {list(reference.shape)} "
                f"(rank {rank}, dim {dim})"
            )
    return rank


def read_variant(path: str | os.PathLike) -> dict:
    """The method variant an adapter was trained for (our safetensors record it; official files are the method)."""
    if Path(path).suffix != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return {key: metadata[key] for key in ("attention", "positions") if key in metadata}


def load_adapter(path: str | os.PathLike, transformer, device=None) -> StandInAdapter:
    """Read, validate against `transformer` (a diffusers WanTransformer3DModel) and build the adapter (float32)."""
    config = transformer.config
    dim = config.num_attention_heads * config.attention_head_dim
    state_dict = read_state_dict(path)
    rank = validate_state_dict(state_dict, dim, config.num_layers)
    with torch.device("meta"):
        adapter = StandInAdapter(dim, config.num_layers, rank, **read_variant(path))
    state_dict = {key: value.to(device=device, dtype=torch.float32) for key, value in state_dict.items()}
    adapter.load_state_dict(state_dict, strict=True, assign=True)
    return adapter


def save_adapter(adapter_or_state_dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write an adapter as safetensors under the official key names, with its shape in the metadata."""
    state_dict, variant = adapter_or_state_dict, {}
    if isinstance(state_dict, StandInAdapter):
        variant = {"attention": state_dict.attention, "positions": state_dict.positions}
        state_dict = state_dict.state_dict()
    state_dict = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    down = state_dict["blocks.0.self_attn.q_loras.down.weight"]
    info = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "rank": str(down.shape[0]),
        "dim": str(down.shape[1]),
        "num_layers": str(1 + max(int(KEY_PATTERN.match(key).group(1)) for key in state_dict)),
        **variant,
    }
    info.update({key: value if isinstance(value, str) else json.dumps(value) for key, value in (metadata or {}).items()})
    return atomic_write(path, lambda temporary: save_file(state_dict, temporary, metadata=info))


def convert(source: str | os.PathLike, destination: str | os.PathLike) -> dict:
    """Any supported adapter file -> our safetensors. Validates the file against its own shapes."""
    state_dict = read_state_dict(source)
    down = state_dict.get("blocks.0.self_attn.q_loras.down.weight")
    if down is None:
        raise AdapterFileError(f"{source} has no blocks.0.self_attn.q_loras.down.weight: not a Stand-In adapter")
    num_layers = 1 + max(int(m.group(1)) for m in map(KEY_PATTERN.match, state_dict) if m)
    rank = validate_state_dict(state_dict, down.shape[1], num_layers)
    save_adapter(state_dict, destination, metadata={"converted_from": Path(source).name})
    return {"tensors": len(state_dict), "rank": rank, "dim": down.shape[1], "num_layers": num_layers}
