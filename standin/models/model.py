"""StandInModel: a frozen diffusers WanTransformer3DModel and its Stand-In adapter as one module.

It is what training wraps (DDP, FSDP) and what benchmarks and evaluations call; the pipeline runs the same
reference stream on its components (standin.models.reference.reference_stream), so there is one path.
"""

import torch
import torch.nn as nn

from standin.models.adapter import DEFAULT_RANK, StandInAdapter
from standin.models.reference import install_reference_attention, reference_stream, video_grid


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


class StandInModel(nn.Module):
    def __init__(self, transformer: nn.Module, adapter: StandInAdapter | None = None, rank: int = DEFAULT_RANK):
        super().__init__()
        self.transformer = transformer
        self.adapter = adapter if adapter is not None else StandInAdapter.for_transformer(transformer, rank)
        install_reference_attention(transformer)

    def freeze_base(self) -> "StandInModel":
        """Only the adapter trains (the base model stays frozen).

        The last block's reference queries feed nothing (reference tokens are dropped after it), so its q LoRA
        can never receive a gradient; it stays frozen so that DDP does not wait for it.
        """
        self.transformer.requires_grad_(False)
        self.adapter.requires_grad_(True)
        self.adapter.blocks[-1].self_attn.q_loras.requires_grad_(False)
        return self

    def reference(self, reference_latents: torch.Tensor, latent_shape, cache: bool = False):
        """Context in which every forward on videos of `latent_shape` [B, C, F, H, W] sees the reference. Training
        keeps backward inside it: gradient checkpointing recomputes the blocks, with their reference, there."""
        grid = video_grid(self.transformer, latent_shape)
        return reference_stream(self.transformer, self.adapter, reference_latents, grid, cache)

    def forward(self, hidden_states, timestep, encoder_hidden_states, reference_latents=None, **kwargs):
        """The base forward (return_dict=False); with reference_latents, inside a reference() of its own."""
        kwargs.setdefault("return_dict", False)
        if reference_latents is None:
            return self.transformer(hidden_states, timestep, encoder_hidden_states, **kwargs)
        if torch.is_grad_enabled() and self.transformer.gradient_checkpointing:
            raise RuntimeError("with gradient checkpointing, backward must run inside the reference: open "
                               "model.reference(...) around forward and backward instead of passing reference_latents")
        with self.reference(reference_latents, hidden_states.shape):
            return self.transformer(hidden_states, timestep, encoder_hidden_states, **kwargs)
