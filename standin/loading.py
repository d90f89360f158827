"""Building a StandInPipeline from what users have: a Wan diffusers folder, an original Wan folder, or a hub id.

- diffusers layout (model_index.json): Wan2.1 and Wan2.2 (two experts) through from_pretrained.
- original layout (the Wan-AI release: sharded diffusion_pytorch_model*.safetensors, Wan2.1_VAE.pth,
  models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/): converted in memory with diffusers' own key converters
  for the transformer and VAE, and a key map to transformers' UMT5EncoderModel for the text encoder.
- anything else that is not a local path is treated as a hub id (needs network access).
The scheduler is always Euler flow matching with the published checkpoints' shift 5, whatever the folder ships,
unless the folder is a StandInPipeline that records another `sampler_shift` (the mini model).
"""

import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers
from safetensors.torch import load_file
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from standin.pipeline import SAMPLER_SHIFT, StandInPipeline, standin_scheduler

ORIGINAL_VAE = "Wan2.1_VAE.pth"
ORIGINAL_TEXT_ENCODER = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_TOKENIZER = "google/umt5-xxl"
WAN_HEAD_DIM = 128


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def is_original_layout(folder: Path) -> bool:
    return (folder / ORIGINAL_VAE).is_file() and any(folder.glob("diffusion_pytorch_model*.safetensors"))


def is_hub_id(base: str | os.PathLike) -> bool:
    """What load_pipeline takes for a hub id when it is no local path: owner/name."""
    return str(base).count("/") == 1 and not str(base).startswith((".", "/"))


def sampler_shift(base: str | os.PathLike) -> float:
    """The Euler shift a base was trained for: what a StandInPipeline folder records, else the published 5."""
    index = Path(base) / "model_index.json"
    if not index.is_file():
        return SAMPLER_SHIFT
    return float(json.loads(index.read_text()).get("sampler_shift", SAMPLER_SHIFT))


def has_two_experts(base: str | os.PathLike) -> bool:
    """Whether a base is Wan2.2's pair of experts (its model_index.json names a transformer_2), read without
    loading any weights. An original-layout folder is Wan2.1: one transformer."""
    path = Path(base)
    if path.exists():
        index = path / "model_index.json"
        config = json.loads(index.read_text()) if index.is_file() else {}
    elif is_hub_id(base):  # its model_index.json only
        config = StandInPipeline.load_config(str(base))
    else:  # load_pipeline says it is not found
        return False
    return (config.get("transformer_2") or [None])[0] is not None


def load_pipeline(base: str | os.PathLike, adapter=None, adapter_2=None, device=None, dtype=None,
                  pipeline_class=StandInPipeline, expert: str | None = None) -> StandInPipeline:
    """A ready pipeline on `device` (CUDA if available); transformer and text encoder in `dtype`
    (bfloat16 on GPU, float32 on CPU), the VAE in float32 as Wan recommends. pipeline_class: a StandInPipeline
    subclass for diffusers folders (standin.vace's for VACE). expert ("high" or "low", two-expert bases only):
    that expert alone, as the pipeline's `transformer` (what training one expert needs); the other one is never
    read from disk, so a 14B expert's pair never has to fit in memory at once."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    path = Path(base)
    # The VAE loads in float32, as Wan recommends (and without diffusers' warning about casting it afterwards).
    dtypes = {"default": dtype, "vae": torch.float32}
    components = {}
    if expert is not None:
        if expert not in ("high", "low") or not has_two_experts(base):
            raise ValueError(f"expert {expert!r}: give high or low, for a base with two experts (Wan2.2)")
        components["transformer_2"] = None
        if expert == "low":
            components["transformer"] = WanTransformer3DModel.from_pretrained(str(base), subfolder="transformer_2",
                                                                              dtype=dtype)
    if path.is_dir() and (path / "model_index.json").is_file():
        pipe = pipeline_class.from_pretrained(path, dtype=dtypes, scheduler=standin_scheduler(), **components)
    elif path.is_dir() and is_original_layout(path) and pipeline_class is StandInPipeline:
        pipe = load_original_layout(path, dtype)
    elif path.exists():
        raise FileNotFoundError(
            f"{path} is neither a Wan diffusers folder (model_index.json) nor an original Wan folder "
            f"(diffusion_pytorch_model*.safetensors and {ORIGINAL_VAE})"
        )
    elif is_hub_id(base):
        pipe = pipeline_class.from_pretrained(str(base), dtype=dtypes, scheduler=standin_scheduler(), **components)
    else:
        raise FileNotFoundError(f"base model not found: {base}")
    if pipe.config.sampler_shift != SAMPLER_SHIFT:
        pipe.register_modules(scheduler=standin_scheduler(pipe.config.sampler_shift))
    pipe.to(device)
    if adapter is not None:
        pipe.load_standin_adapter(adapter, adapter_2)
    return pipe


def _transformer_config(state_dict: dict[str, torch.Tensor], head_dim: int) -> dict:
    """The WanTransformer3DModel config implied by converted weights (original folders ship no diffusers config)."""
    dim, in_channels = state_dict["patch_embedding.weight"].shape[:2]
    num_layers = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("blocks."))
    return dict(
        num_attention_heads=dim // head_dim, attention_head_dim=head_dim, in_channels=in_channels,
        out_channels=state_dict["proj_out.weight"].shape[0] // 4, num_layers=num_layers,
        ffn_dim=state_dict["blocks.0.ffn.net.0.proj.weight"].shape[0],
        text_dim=state_dict["condition_embedder.text_embedder.linear_1.weight"].shape[1],
        freq_dim=state_dict["condition_embedder.time_embedder.linear_1.weight"].shape[1],
        cross_attn_norm="blocks.0.norm2.weight" in state_dict,
    )


def load_original_transformer(folder: Path, dtype=torch.float32, head_dim: int = WAN_HEAD_DIM):
    state_dict = {}
    for shard in sorted(folder.glob("diffusion_pytorch_model*.safetensors")):
        state_dict.update(load_file(str(shard)))
    if not state_dict:
        raise FileNotFoundError(f"no diffusion_pytorch_model*.safetensors in {folder}")
    state_dict = convert_wan_transformer_to_diffusers(state_dict)
    with torch.device("meta"):
        transformer = WanTransformer3DModel(**_transformer_config(state_dict, head_dim))
    transformer.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    # RoPE tables are non-persistent buffers: rebuild them off the meta device.
    transformer.rope = type(transformer.rope)(head_dim, transformer.config.patch_size, transformer.config.rope_max_seq_len)
    return transformer.eval()


def original_t5_to_umt5(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], UMT5Config]:
    """Wan's own UMT5 encoder checkpoint -> transformers' UMT5EncoderModel weights and config."""
    renames = {
        "attn.q": "layer.0.SelfAttention.q", "attn.k": "layer.0.SelfAttention.k",
        "attn.v": "layer.0.SelfAttention.v", "attn.o": "layer.0.SelfAttention.o",
        "pos_embedding.embedding": "layer.0.SelfAttention.relative_attention_bias",
        "norm1": "layer.0.layer_norm", "norm2": "layer.1.layer_norm",
        "ffn.gate.0": "layer.1.DenseReluDense.wi_0", "ffn.fc1": "layer.1.DenseReluDense.wi_1",
        "ffn.fc2": "layer.1.DenseReluDense.wo",
    }
    converted = {"shared.weight": state_dict["token_embedding.weight"],
                 "encoder.final_layer_norm.weight": state_dict["norm.weight"]}
    for key, value in state_dict.items():
        if not key.startswith("blocks."):
            continue
        _, index, rest = key.split(".", 2)
        name = rest.rsplit(".", 1)[0]
        if name not in renames:
            raise KeyError(f"unexpected key in the original UMT5 checkpoint: {key}")
        converted[f"encoder.block.{index}.{renames[name]}.weight"] = value
    vocab_size, d_model = converted["shared.weight"].shape
    num_buckets, num_heads = converted["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    config = UMT5Config(
        vocab_size=vocab_size, d_model=d_model, num_heads=num_heads, relative_attention_num_buckets=num_buckets,
        d_kv=converted["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // num_heads,
        d_ff=converted["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        num_layers=1 + max(int(k.split(".")[2]) for k in converted if k.startswith("encoder.block.")),
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
    )
    return converted, config


def load_original_text_encoder(path: Path, dtype=torch.float32) -> UMT5EncoderModel:
    converted, config = original_t5_to_umt5(torch.load(path, map_location="cpu", weights_only=True))
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    converted["encoder.embed_tokens.weight"] = converted["shared.weight"]
    model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def load_original_vae(path: Path) -> AutoencoderKLWan:
    """Wan2.1_VAE.pth (the VAE of Wan2.1 and Wan2.2-A14B) -> AutoencoderKLWan with its default config."""
    state_dict = convert_wan_vae_to_diffusers(torch.load(path, map_location="cpu", weights_only=True))
    vae = AutoencoderKLWan()
    vae.load_state_dict(state_dict, strict=True)
    return vae.eval()


def load_original_layout(folder: Path, dtype=torch.float32) -> StandInPipeline:
    """A Wan2.1-T2V original release folder (Wan2.2-A14B's two experts come in diffusers layout)."""
    return StandInPipeline(
        tokenizer=AutoTokenizer.from_pretrained(folder / ORIGINAL_TOKENIZER),
        text_encoder=load_original_text_encoder(folder / ORIGINAL_TEXT_ENCODER, dtype),
        vae=load_original_vae(folder / ORIGINAL_VAE),
        scheduler=standin_scheduler(),
        transformer=load_original_transformer(folder, dtype),
    )
