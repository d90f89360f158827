"""Style and distillation LoRAs on the base, composed with Stand-In (docs/compositions.md).

Loading is diffusers' own: StandInPipeline is a WanPipeline, so `pipe.load_lora_weights(file, adapter_name=...)`
(WanLoraLoaderMixin, with its converters for the community `diffusion_model.` prefix, kohya / musubi `lora_unet_`
names, alpha scaling and the lightx2v `diff_b` biases) and `pipe.set_adapters(names, weights)` for the scales.
This module only adds what a command line needs around them: FILE[:SCALE] arguments, a check that a file is a
LoRA of THIS base before anything is loaded (diffusers / PEFT would otherwise fail deep inside, or skip unknown
modules with a warning), one-line errors, and the few-step preset of the distillation LoRAs.

Semantics (the published infer_with_lora.py merges the LoRA into the base weights before Stand-In is attached):
PEFT wraps the base's Linear layers, so the LoRA acts wherever the base weights act -- on the video tokens AND on
the reference stream, whose projections go through the same layers -- as W + s B A would. The Stand-In adapter is
not a module of the transformer and is never touched; our attention processors sit on the attention modules,
which PEFT leaves in place (it replaces their to_q / to_k / ... children only).
"""

import math
import re
from pathlib import Path

import torch

# The lightx2v step- and CFG-distillation LoRAs (Wan2.1-T2V-14B, Wan2.2-A14B): 4 Euler steps, no text guidance,
# shift 5 on the timesteps [1000, 750, 500, 250] -- lightx2v's distill configs (`infer_steps` 4, `enable_cfg`
# false, `sample_shift` 5, `denoising_step_list` [1000, 750, 500, 250]), which is exactly Stand-In's own sampler
# (sigma_i = 1 - i/N, shifted by 5) at N = 4.
PRESETS = {
    "lightx2v": {"num_inference_steps": 4, "guidance_scale": 1.0, "shift": 5.0},
}

EXPERTS = ("transformer", "transformer_2")


class LoraFileError(ValueError):
    """A file that is not a LoRA, or not one of this base: the message is one line."""


def parse_lora_argument(text: str) -> tuple[str, float]:
    """'FILE' or 'FILE:SCALE' -> (FILE, scale); a colon followed by something that is not a number belongs to the
    file name (e.g. C:\\loras\\style.safetensors)."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            pass
        else:
            path = head
    if not math.isfinite(scale):
        raise ValueError(f"the scale of a LoRA must be a finite number, got {text!r}")
    return path, scale


def read_lora(pipe, path) -> dict[str, torch.Tensor]:
    """The LoRA's state dict as diffusers converts it (keys `transformer.<module>.lora_A.weight`, ...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        state_dict = pipe.lora_state_dict(str(path))
    except Exception as error:  # an unreadable file, or names the converters cannot map
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LoraFileError(f"{path} is not a LoRA file diffusers can read for Wan ({type(error).__name__}: "
                            f"{reason[:200]})") from None
    return state_dict


def check_lora(state_dict: dict[str, torch.Tensor], transformer: torch.nn.Module, name: str = "LoRA") -> int:
    """Every lora_A / lora_B names a Linear of `transformer` with matching shapes; returns the layers covered."""
    if not state_dict:
        raise LoraFileError(f"{name} holds no tensors")
    if not all("lora" in key for key in state_dict):
        bad = next(key for key in state_dict if "lora" not in key)
        raise LoraFileError(f"{name} is not a LoRA file (no lora weights; e.g. key {bad!r})")
    modules = dict(transformer.named_modules())
    layers = {}
    for key, tensor in state_dict.items():
        match = re.fullmatch(r"(?:transformer\.)?(.+)\.(lora_A|lora_B)\.(weight|bias)", key)
        if match is None:
            raise LoraFileError(f"{name}: unexpected key {key!r} (not a transformer lora_A / lora_B tensor)")
        module_name, part, kind = match.groups()
        layers.setdefault(module_name, {})[f"{part}.{kind}"] = tensor
    for module_name, parts in layers.items():
        module = modules.get(module_name)
        # PEFT may already wrap it (another LoRA loaded before): its base layer has the shapes.
        module = getattr(module, "base_layer", module)
        if not isinstance(module, torch.nn.Linear):
            raise LoraFileError(f"{name} is for another model: this base has no linear layer {module_name!r}")
        down, up = parts.get("lora_A.weight"), parts.get("lora_B.weight")
        if down is None or up is None:
            raise LoraFileError(f"{name}: {module_name} has only one of lora_A / lora_B")
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != module.in_features or \
                up.shape[0] != module.out_features or up.shape[1] != down.shape[0]:
            raise LoraFileError(
                f"{name} is for another base: {module_name} is {module.in_features} -> {module.out_features} here, "
                f"the LoRA's is {tuple(down.shape)} / {tuple(up.shape)} (lora_A / lora_B)")
        bias = parts.get("lora_B.bias")
        if bias is not None and tuple(bias.shape) != (module.out_features,):
            raise LoraFileError(f"{name} is for another base: {module_name}'s bias has {tuple(bias.shape)} values, "
                                f"this base {module.out_features}")
    return len(layers)


def load_loras(pipe, loras, expert: str = "transformer", prefix: str | None = None) -> list[str]:
    """Load (file, scale) pairs into one expert of `pipe` with diffusers' loader, each checked first, and make
    every LoRA loaded so far active at its scale. Returns the adapter names given to this expert's LoRAs."""
    if expert not in EXPERTS:
        raise ValueError(f"expert must be one of {EXPERTS}, got {expert!r}")
    transformer = getattr(pipe, expert, None)
    if transformer is None:
        raise ValueError(f"this pipeline has no {expert} (Wan2.2's low-noise expert): no LoRA can go there")
    prefix = prefix or ("lora" if expert == "transformer" else "lora_low")
    entries = [(str(path), float(scale)) for path, scale in loras]
    states = []
    for path, scale in entries:  # read and check every file before loading any
        state_dict = read_lora(pipe, path)
        check_lora(state_dict, transformer, name=path)
        states.append(state_dict)
    taken = set(pipe.get_list_adapters().get(expert, []))
    names = []
    for (path, scale), state_dict in zip(entries, states):
        name = next(f"{prefix}_{k}" for k in range(len(taken) + len(names) + 1)
                    if f"{prefix}_{k}" not in taken and f"{prefix}_{k}" not in names)
        pipe.load_lora_weights(state_dict, adapter_name=name, load_into_transformer_2=expert == "transformer_2")
        names.append(name)
        _scales(pipe)[name] = scale
    set_scales(pipe)
    return names


def _scales(pipe) -> dict[str, float]:
    """The scale of each LoRA loaded through load_loras, kept on the pipeline."""
    if getattr(pipe, "_lora_scales", None) is None:
        pipe._lora_scales = {}
    return pipe._lora_scales


def set_scales(pipe, scales: dict[str, float] | None = None) -> None:
    """Activate every loaded LoRA of `pipe` at its scale (those given here, else the one it was loaded with)."""
    for name, scale in (scales or {}).items():
        _scales(pipe)[name] = float(scale)
    names = sorted({name for adapters in pipe.get_list_adapters().values() for name in adapters})
    if names:
        pipe.set_adapters(names, [_scales(pipe).get(name, 1.0) for name in names])


def apply_preset(pipe, name: str) -> dict:
    """The sampler settings of a preset: sets the scheduler's shift on `pipe`, returns the call's arguments."""
    from standin.pipeline import standin_scheduler

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    preset = dict(PRESETS[name])
    shift = preset.pop("shift")
    if pipe.scheduler.config.get("shift") != shift:
        pipe.register_modules(scheduler=standin_scheduler(shift))
    return preset
