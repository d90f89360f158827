"""Stand-In adapter files: the official .ckpt, the community safetensors, and ours (docs/method.md section 7).

All three hold the same 240 tensors (for 40 blocks) under the official names; the community file prefixes them
with "diffusion_model.", ours adds metadata. Pickles are read with weights_only=True: no code is executed, and
a pickle that needs more than plain tensors is refused (never loaded "unsafely"). The format is chosen by the
extension, in any case: .safetensors is safetensors, anything else a torch checkpoint. We write safetensors
only. Adapters with NaN or infinite values are refused.
"""

import json
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from standin.io import atomic_write, loader_error_reason, regular_file_problem
from standin.models.adapter import StandInAdapter

COMMUNITY_PREFIX = "diffusion_model."
KEY_PATTERN = re.compile(r"^blocks\.(\d+)\.self_attn\.([qkv])_loras\.(down|up)\.weight$")
FORMAT_NAME = "standin-adapter"
FORMAT_VERSION = "1"

# Known Wan base widths, to name the base an adapter belongs to in error messages.
BASE_NAMES = {5120: "Wan2.1-T2V-14B / Wan2.2-A14B (dim 5120)", 1536: "Wan2.1-T2V-1.3B (dim 1536)"}
FIRST_DOWN = "blocks.0.self_attn.q_loras.down.weight"
ACCEPTED = (
    "accepted: .safetensors files, and torch checkpoints (.ckpt, .pt, .pth) that hold only tensors "
    "(torch.save of a dict of tensors)"
)


class AdapterFileError(ValueError):
    """The adapter file cannot be read, or does not fit the base model."""


def _base_name(dim: int) -> str:
    return BASE_NAMES.get(dim, f"a base of width {dim}")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of an adapter file under the official key names, whatever its format."""
    path = Path(path)
    problem = regular_file_problem(path, "file")
    if problem == "no such file":
        raise AdapterFileError(f"adapter file not found: {path}")
    if problem:
        raise AdapterFileError(f"adapter {path}: {problem}")
    if path.stat().st_size == 0:
        raise AdapterFileError(f"cannot read adapter file {path}: the file is empty (0 bytes); {ACCEPTED}")
    try:
        if is_safetensors(path):
            state_dict = load_file(str(path))
        elif not _looks_like_torch_checkpoint(path):
            raise AdapterFileError(
                f"cannot read adapter file {path}: not a torch checkpoint (it starts neither like the zip "
                f"archive torch.save writes nor like a pickle); {ACCEPTED}"
            )
        else:
            with warnings.catch_warnings():  # torch's notes on pickle protocols are not for our users
                warnings.simplefilter("ignore", UserWarning)
                state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except AdapterFileError:
        raise
    except (SafetensorError, RuntimeError, EOFError, OSError) as error:
        raise AdapterFileError(f"cannot read adapter file {path}: {_reason(error)}; {ACCEPTED}") from None
    except Exception as error:  # the weights-only unpickler refuses anything but plain tensors and containers
        raise AdapterFileError(
            f"{path} is not a plain tensor checkpoint (refused to unpickle it: {_reason(error)}). It is either "
            f"not a checkpoint or a pickle that needs code to load, which is never run; {ACCEPTED}"
        ) from None
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise AdapterFileError(f"{path} does not hold a flat dict of tensors")
    if state_dict and all(key.startswith(COMMUNITY_PREFIX) for key in state_dict):
        state_dict = {key[len(COMMUNITY_PREFIX) :]: value for key, value in state_dict.items()}
    return state_dict


def is_safetensors(path: str | os.PathLike) -> bool:
    """The format follows the extension, whatever its case (.safetensors, .SAFETENSORS)."""
    return Path(path).suffix.lower() == ".safetensors"


def _looks_like_torch_checkpoint(path: Path) -> bool:
    """torch.save writes a zip archive ("PK"); old checkpoints are pickles (protocol 2+ starts with 0x80)."""
    with open(path, "rb") as handle:
        start = handle.read(2)
    return start == b"PK" or start[:1] == b"\x80"


def _reason(error: Exception) -> str:
    """The loader's reason, without torch's advice to retry with weights_only=False (see loader_error_reason)."""
    if isinstance(error, EOFError):
        return "the file ends too early (truncated?)"
    return loader_error_reason(error)


def _first_down(state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
    """blocks.0.self_attn.q_loras.down.weight, [rank, dim], or AdapterFileError saying what is wrong with it."""
    down = state_dict.get(FIRST_DOWN)
    if down is None:
        raise AdapterFileError(f"not a Stand-In adapter: it has no {FIRST_DOWN}")
    if down.ndim != 2:
        raise AdapterFileError(
            f"{FIRST_DOWN} has shape {list(down.shape)}: a LoRA down weight is 2-D, [rank, dim]"
        )
    return down


def check_finite(state_dict: dict[str, torch.Tensor]) -> None:
    """AdapterFileError naming the first tensor (in key order) with NaN or infinite values."""
    for key in sorted(state_dict):
        value = state_dict[key]
        if value.device.type == "meta" or not (value.is_floating_point() or value.is_complex()):
            continue
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise AdapterFileError(
                f"adapter tensor {key} has {bad} NaN or infinite values of {value.numel()}: the file is "
                "corrupt or came from a diverged training run"
            )


def validate_state_dict(state_dict: dict[str, torch.Tensor], dim: int, num_layers: int) -> int:
    """Check the tensors against a base of width `dim` with `num_layers` blocks; return the LoRA rank.
    Keys, shapes, then values: NaN or infinite values are refused."""
    unexpected = sorted(key for key in state_dict if not KEY_PATTERN.match(key))
    if unexpected:
        raise AdapterFileError(
            f"not a Stand-In adapter: {len(unexpected)} unexpected keys, e.g. {unexpected[:3]} "
            "(expected blocks.N.self_attn.{q,k,v}_loras.{down,up}.weight)"
        )
    rank, file_dim = _first_down(state_dict).shape
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
    check_finite(state_dict)
    return rank


def read_metadata(path: str | os.PathLike) -> dict:
    """A safetensors adapter's metadata ({} for other formats)."""
    if not is_safetensors(path):
        return {}
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def read_variant(path: str | os.PathLike) -> dict:
    """The method variant an adapter was trained for (our safetensors record it; official files are the method)."""
    metadata = read_metadata(path)
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
    """Write an adapter as safetensors under the official key names, with its shape in the metadata.

    `path` must end in .safetensors (any case): the readers choose the format by the extension. A failed write
    (disk full) raises OSError and leaves whatever was at `path` untouched.
    """
    if not is_safetensors(path):
        raise AdapterFileError(
            f"{path}: adapters are written as safetensors only; name the output *.safetensors"
        )
    state_dict, variant = adapter_or_state_dict, {}
    if isinstance(state_dict, StandInAdapter):
        variant = {"attention": state_dict.attention, "positions": state_dict.positions}
        state_dict = state_dict.state_dict()
    state_dict = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    down = _first_down(state_dict)
    info = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "rank": str(down.shape[0]),
        "dim": str(down.shape[1]),
        "num_layers": str(1 + max(int(KEY_PATTERN.match(key).group(1)) for key in state_dict)),
        **variant,
    }
    info.update({key: value if isinstance(value, str) else json.dumps(value) for key, value in (metadata or {}).items()})

    def write(temporary):
        try:
            save_file(state_dict, temporary, metadata=info)
        except (SafetensorError, OSError) as error:  # e.g. no space left on the device
            message = f"cannot write adapter {path}: {getattr(error, 'strerror', None) or error}"
            errno = getattr(error, "errno", None)
            raise (OSError(errno, message) if errno else OSError(message)) from None

    return atomic_write(path, write)


def convert(source: str | os.PathLike, destination: str | os.PathLike) -> dict:
    """Any supported adapter file -> our safetensors (`destination` must end in .safetensors). Validates the
    file against its own shapes and values; a failed write leaves nothing at `destination`."""
    if not is_safetensors(destination):
        raise AdapterFileError(
            f"{destination}: adapters are converted to safetensors only; name the output *.safetensors"
        )
    state_dict = read_state_dict(source)
    try:
        down = _first_down(state_dict)
    except AdapterFileError as error:
        raise AdapterFileError(f"{source}: {error}") from None
    num_layers = 1 + max(int(m.group(1)) for m in map(KEY_PATTERN.match, state_dict) if m)
    rank = validate_state_dict(state_dict, down.shape[1], num_layers)
    save_adapter(state_dict, destination, metadata={"converted_from": Path(source).name})
    return {"tensors": len(state_dict), "rank": rank, "dim": down.shape[1], "num_layers": num_layers}
