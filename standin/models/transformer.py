"""StandInTransformer: a frozen diffusers WanTransformer3DModel and its Stand-In adapter as one module.

Training, benchmarks and tests use this module; the pipeline uses the same functions on its components.
"""

import torch
import torch.nn as nn

from standin.models.adapter import DEFAULT_RANK, StandInAdapter
from standin.models.reference import (
    ReferenceKV,
    encode_reference,
    install_reference_attention,
    joint_reference_context,
    reference_aware_checkpoint,
    reference_context,
    video_grid,
)


def cast_like_pretrained(transformer: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast to `dtype` but leave the modules diffusers keeps in float32 (RoPE tables, time embedder, norms and
    modulation tables) as they are, as from_pretrained(torch_dtype=...) does."""
    keep = set(transformer._keep_in_fp32_modules or [])
    for module_name, module in transformer.named_modules():
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, tensor in tensors:
            if tensor.is_floating_point() and not keep & set(f"{module_name}.{name}".split(".")):
                tensor.data = tensor.data.to(dtype)
    return transformer


class StandInTransformer(nn.Module):
    def __init__(self, transformer: nn.Module, adapter: StandInAdapter | None = None, rank: int = DEFAULT_RANK):
        super().__init__()
        self.transformer = transformer
        self.adapter = adapter if adapter is not None else StandInAdapter.for_transformer(transformer, rank)
        install_reference_attention(transformer)

    def freeze_base(self) -> "StandInTransformer":
        """Only the adapter trains (SPEC: the base model stays frozen).

        The last block's reference queries feed nothing (reference tokens are dropped after it), so its q LoRA
        can never receive a gradient; it stays frozen so that DDP does not wait for it.
        """
        self.transformer.requires_grad_(False)
        self.adapter.requires_grad_(True)
        self.adapter.blocks[-1].self_attn.q_loras.requires_grad_(False)
        return self

    def enable_gradient_checkpointing(self) -> "StandInTransformer":
        """Checkpoint the video blocks (recomputed with their reference) and the reference blocks."""
        self.transformer.enable_gradient_checkpointing(gradient_checkpointing_func=reference_aware_checkpoint)
        return self

    def encode_reference(self, reference_latents: torch.Tensor, grid: tuple[int, int, int]) -> ReferenceKV:
        return encode_reference(self.transformer, self.adapter, reference_latents, grid)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        reference_latents: torch.Tensor | None = None,
        reference_kv: ReferenceKV | None = None,
        **kwargs,
    ):
        """Base forward with the reference stream. Without reference_kv the reference is encoded in this call
        (uncached); with it (from encode_reference) the cached keys and values are reused. An adapter trained with
        vanilla attention needs the reference stream computed along with the video in every call."""
        kwargs.setdefault("return_dict", False)
        if reference_latents is None and reference_kv is None:
            return self.transformer(hidden_states, timestep, encoder_hidden_states, **kwargs)
        grid = video_grid(self.transformer, hidden_states.shape)
        if self.adapter.attention == "vanilla":
            if reference_kv is not None:
                raise ValueError("an adapter with vanilla attention has no reference cache")
            with joint_reference_context(self.transformer, self.adapter, reference_latents, grid):
                return self.transformer(hidden_states, timestep, encoder_hidden_states, **kwargs)
        checkpoint_func = getattr(self.transformer, "_gradient_checkpointing_func", None)
        if torch.is_grad_enabled() and self.transformer.gradient_checkpointing and (
            checkpoint_func is not reference_aware_checkpoint
        ):
            raise RuntimeError(
                "gradient checkpointing must be enabled with StandInTransformer.enable_gradient_checkpointing(): "
                "the plain one recomputes the blocks without the reference"
            )
        if reference_kv is None:
            reference_kv = self.encode_reference(reference_latents, grid)
        elif reference_kv.video_grid != grid:
            raise ValueError(f"reference cache was built for video grid {reference_kv.video_grid}, input is {grid}")
        with reference_context(self.transformer, reference_kv):
            return self.transformer(hidden_states, timestep, encoder_hidden_states, **kwargs)
