"""The reference stream of Stand-In on diffusers' WanTransformer3DModel (SPEC sections 2-4).

Reference queries attend only to reference keys, so the whole reference stream can run on its own, before
and apart from the video: `encode_reference` runs it through every block and returns each block's reference
keys and values (after norm and RoPE). The video stream is then the unmodified diffusers forward, whose
self-attention processors append those cached keys and values (`ReferenceAttnProcessor`). This is exactly
the joint computation of the paper, done once per generation instead of once per forward.

`JointReference` advances the reference stream block by block inside the video's forward instead (the official
order; the only one for the vanilla-attention ablation). With record=True its first forward also fills the cache:
that is how the pipeline builds it, because offloading hooks (diffusers group offloading, model CPU offload) only
bring a block's weights while that block's forward runs.

Without an active reference the processors hand every call to the original diffusers processor, so the
model is the base model bit for bit.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers.hooks.group_offloading import _is_group_offload_enabled
from diffusers.models.attention_dispatch import dispatch_attention_fn

from standin.models.adapter import StandInAdapter


@dataclass
class ReferenceKV:
    """Per-block reference keys and values, each [batch (1 or the video batch), tokens, heads, head_dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    video_grid: tuple[int, int, int]  # post-patch (frames, height, width) the reference positions were built for

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2d, 2d+1) of x [B, L, H, D] by the angles whose cos/sin (repeated per pair)
    are given as [1, L, 1, D], the layout of diffusers' WanRotaryPosEmbed. Math in float32, as Wan does.

    As one complex product per pair (Wan's own formulation): on CPU about 4x faster than rotating the even and
    odd channels separately, and equal to it up to float32 rounding."""
    rotation = torch.complex(cos[..., 0::2].float(), sin[..., 0::2].float())
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def reference_rope(rope: nn.Module, reference_grid: tuple[int, int], video_grid: tuple[int, int, int],
                   positions: str = "shifted"):
    """cos/sin tables [1, h_r * w_r, 1, head_dim] for reference token (j, k) at positions (-1, h + j, w + k), or
    at (0, j, k) on the video's own grid for positions="shared" (the ablation).

    Cut from the base model's own tables, obtained through its RoPE module's forward (on a shape-only input) so
    that offloading hooks bring the tables; position -1 is the rotation by -theta, i.e. (cos, -sin) of time 1.
    """
    _, video_h, video_w = video_grid
    ref_h, ref_w = reference_grid
    time_row, h0, w0 = (1, video_h, video_w) if positions == "shifted" else (0, 0, 0)
    if h0 + ref_h > rope.max_seq_len or w0 + ref_w > rope.max_seq_len:
        raise ValueError(
            f"reference positions reach {max(h0 + ref_h, w0 + ref_w)}, beyond the base model's RoPE table "
            f"of {rope.max_seq_len} positions: the video grid {video_h}x{video_w} is too large for this model"
        )
    grid = (time_row + 1, h0 + ref_h, w0 + ref_w)
    p_t, p_h, p_w = rope.patch_size
    shape_only = torch.zeros(()).expand(1, 1, grid[0] * p_t, grid[1] * p_h, grid[2] * p_w)
    tables = [table.reshape(*grid, -1)[time_row, h0:, w0:].reshape(1, ref_h * ref_w, 1, -1)
              for table in rope(shape_only)]
    cos, sin = tables
    if positions == "shifted":
        sin = torch.cat([-sin[..., : rope.t_dim], sin[..., rope.t_dim :]], dim=-1)
    return cos, sin


def project_qkv(attn: nn.Module, x: torch.Tensor, rotary_emb, loras: nn.Module | None = None):
    """Q, K, V [B, L, heads, head_dim] of a WanAttention self-attention, with optional reference LoRA deltas added
    before the q/k RMS norm (SPEC section 2)."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(x).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    if loras is not None:
        query = (query.float() + loras.q_loras(x)).type_as(query)
        key = (key.float() + loras.k_loras(x)).type_as(key)
        value = (value.float() + loras.v_loras(x)).type_as(value)
    query, key = attn.norm_q(query), attn.norm_k(key)
    query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
    query, key = apply_rope(query, *rotary_emb), apply_rope(key, *rotary_emb)
    return query, key, value


def attention_output(attn: nn.Module, query, key, value, backend) -> torch.Tensor:
    hidden_states = dispatch_attention_fn(query, key, value, backend=backend)
    hidden_states = hidden_states.flatten(2, 3).type_as(query)
    return attn.to_out[1](attn.to_out[0](hidden_states))


class ReferenceAttnProcessor:
    """Video self-attention over [video; reference] keys and values; the base processor when no reference is set."""

    def __init__(self, base_processor):
        self.base_processor = base_processor
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None  # cached reference keys and values
        self.joint: "JointReference | None" = None  # or the reference stream computed along with the video

    # diffusers sets attention backends and context parallelism on processors: keep the wrapped one in step.
    @property
    def _attention_backend(self):
        return self.base_processor._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, backend):
        self.base_processor._attention_backend = backend

    @property
    def _parallel_config(self):
        return self.base_processor._parallel_config

    @_parallel_config.setter
    def _parallel_config(self, config):
        self.base_processor._parallel_config = config

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if self.reference is None and self.joint is None:
            return self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the Stand-In reference only extends self-attention without a mask")
        if self.joint is not None:
            return self.joint.attend(attn, hidden_states, rotary_emb, self._attention_backend)
        query, key, value = project_qkv(attn, hidden_states, rotary_emb)
        ref_key, ref_value = self.reference
        batch = query.shape[0]
        key = torch.cat([key, ref_key.expand(batch, -1, -1, -1).type_as(key)], dim=1)
        value = torch.cat([value, ref_value.expand(batch, -1, -1, -1).type_as(value)], dim=1)
        return attention_output(attn, query, key, value, self._attention_backend)


def install_reference_attention(transformer: nn.Module) -> None:
    """Wrap every block's self-attention processor once; idempotent."""
    for block in transformer.blocks:
        if not isinstance(block.attn1.processor, ReferenceAttnProcessor):
            block.attn1.processor = ReferenceAttnProcessor(block.attn1.processor)


def _reference_processors(transformer: nn.Module) -> list[ReferenceAttnProcessor]:
    processors = [block.attn1.processor for block in transformer.blocks]
    if not all(isinstance(p, ReferenceAttnProcessor) for p in processors):
        raise RuntimeError(
            "this transformer's attention processors were replaced after Stand-In was installed "
            "(e.g. by set_attn_processor); call install_reference_attention(transformer) again"
        )
    return processors


def _check_idle(processors) -> None:
    if any(p.reference is not None or p.joint is not None for p in processors):
        raise RuntimeError("a reference is already active on this transformer; nested generations are not supported")


@contextmanager
def reference_context(transformer: nn.Module, reference_kv: ReferenceKV):
    """Every forward inside sees `reference_kv`; on exit (also on an exception) the model is the base model again."""
    processors = _reference_processors(transformer)
    if len(reference_kv.keys) != len(processors):
        raise ValueError(f"reference cache has {len(reference_kv.keys)} blocks, the transformer {len(processors)}")
    _check_idle(processors)
    try:
        for processor, key, value in zip(processors, reference_kv.keys, reference_kv.values):
            processor.reference = (key, value)
        yield reference_kv
    finally:
        for processor in processors:
            processor.reference = None


def reference_aware_checkpoint(block: nn.Module, *args):
    """Gradient checkpointing for the video blocks that recomputes them with the reference they saw.

    The backward pass recomputes each block after the reference context has closed; the block's cached reference
    keys and values are captured here and made visible again for the recomputation.
    """
    processor = block.attn1.processor
    reference = processor.reference

    def run(*inputs):
        outer, processor.reference = processor.reference, reference
        try:
            return block(*inputs)
        finally:
            processor.reference = outer

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def video_grid(transformer: nn.Module, latent_shape) -> tuple[int, int, int]:
    """Post-patch token grid (frames, height, width) of a latent video [B, C, F, H, W]."""
    p_t, p_h, p_w = transformer.config.patch_size
    return latent_shape[2] // p_t, latent_shape[3] // p_h, latent_shape[4] // p_w


def _timestep_zero_modulation(transformer: nn.Module, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The blocks' shared time projection [B, 6, dim] at t = 0: the reference is a clean image."""
    embedder = transformer.condition_embedder
    timestep = embedder.timesteps_proj(torch.zeros(batch, device=device))
    timestep = timestep.to(next(embedder.time_embedder.parameters()).dtype)
    temb = embedder.time_embedder(timestep).to(dtype)
    return embedder.time_proj(embedder.act_fn(temb)).unflatten(1, (6, -1))


def _reference_qkv(block, loras, x, modulation, rotary_emb):
    shift, scale = _modulation(block, modulation)[:2]
    normed = (block.norm1(x.float()) * (1 + scale) + shift).type_as(x)
    return project_qkv(block.attn1, normed, rotary_emb, loras)


def _reference_update(block, x, attn_out, modulation):
    """The rest of a block for reference tokens: gated residual, no cross-attention (the reference never sees the
    prompt), feed-forward with the reference's own modulation."""
    gate, ff_shift, ff_scale, ff_gate = _modulation(block, modulation)[2:]
    x = (x.float() + attn_out * gate).type_as(x)
    normed = (block.norm3(x.float()) * (1 + ff_scale) + ff_shift).type_as(x)
    return (x.float() + block.ffn(normed).float() * ff_gate).type_as(x)


def _modulation(block, modulation):
    """shift, scale, gate, ff_shift, ff_scale, ff_gate of a block at the reference's timestep 0."""
    return (block.scale_shift_table + modulation.float()).chunk(6, dim=1)


def _reference_block(block, loras, x, modulation, rotary_emb, last: bool):
    """One block of the reference stream: its K/V, and its output tokens (None for the last block, unused)."""
    query, key, value = _reference_qkv(block, loras, x, modulation, rotary_emb)
    if last:
        return None, key, value
    attn_out = attention_output(block.attn1, query, key, value, block.attn1.processor._attention_backend)
    return _reference_update(block, x, attn_out, modulation), key, value


def _attach(transformer, adapter: StandInAdapter) -> None:
    """Check that the adapter fits the transformer and wrap its attention processors."""
    if len(adapter.blocks) != len(transformer.blocks):
        raise ValueError(f"adapter has {len(adapter.blocks)} blocks, the transformer {len(transformer.blocks)}")
    install_reference_attention(transformer)


def _embed_reference(transformer, adapter: StandInAdapter, reference_latents, grid):
    """Reference tokens, their RoPE tables and the timestep-0 modulation, on the reference latents' device."""
    dtype = transformer.patch_embedding.weight.dtype
    device = reference_latents.device
    x = transformer.patch_embedding(reference_latents.to(dtype))
    reference_grid = tuple(x.shape[3:])
    x = x.flatten(2).transpose(1, 2).contiguous()
    rotary_emb = reference_rope(transformer.rope, reference_grid, grid, adapter.positions)
    rotary_emb = tuple(t.to(device) for t in rotary_emb)
    return x, rotary_emb, _timestep_zero_modulation(transformer, x.shape[0], dtype, device)


def encode_reference(
    transformer: nn.Module,
    adapter: StandInAdapter,
    reference_latents: torch.Tensor,
    video_grid: tuple[int, int, int],
) -> ReferenceKV:
    """Run the reference stream through all blocks. reference_latents: normalised VAE latents [B, C, 1, H, W]."""
    if adapter.attention != "restricted":
        raise ValueError("only restricted attention makes the reference independent of the video: nothing to cache")
    if _is_group_offload_enabled(transformer):
        raise RuntimeError(
            "encode_reference calls the blocks' parts outside their forward, where group offloading does not bring "
            "their weights: record the cache during the first forward instead (joint_reference_context(..., "
            "record=True), as StandInPipeline does)"
        )
    _attach(transformer, adapter)
    x, rotary_emb, modulation = _embed_reference(transformer, adapter, reference_latents, video_grid)
    checkpointing = torch.is_grad_enabled() and transformer.gradient_checkpointing
    keys, values = [], []
    for index, (block, block_adapter) in enumerate(zip(transformer.blocks, adapter.blocks)):
        args = (block, block_adapter.self_attn, x, modulation, rotary_emb, index == len(transformer.blocks) - 1)
        if checkpointing:
            x, key, value = torch.utils.checkpoint.checkpoint(_reference_block, *args, use_reentrant=False)
        else:
            x, key, value = _reference_block(*args)
        keys.append(key)
        values.append(value)
    return ReferenceKV(keys, values, tuple(video_grid))


class JointReference:
    """The reference stream advanced block by block together with the video, inside the video's forward.

    This is the order of the official implementation. It is the only one possible for the "vanilla" ablation,
    where reference queries also attend to the video, and it cross-checks the cache for restricted attention.
    Everything runs inside the blocks' forwards, so offloading hooks (diffusers group offloading, model CPU
    offload) bring the weights; with record=True the first forward also fills the cache (`recorded`).
    """

    def __init__(self, transformer, adapter: StandInAdapter, reference_latents, grid, record: bool = False):
        if record and adapter.attention != "restricted":
            raise ValueError("only restricted attention makes the reference independent of the video: nothing to cache")
        _attach(transformer, adapter)
        self.transformer, self.adapter = transformer, adapter
        self.reference_latents, self.grid = reference_latents, grid
        self.blocks = list(transformer.blocks)
        self.block_index = {id(block.attn1): i for i, block in enumerate(self.blocks)}
        self.embedded = None  # tokens, RoPE tables, modulation: made in the first forward, where hooks onload
        self.hidden = None
        self.record = record
        self.keys, self.values = [], []

    @property
    def recorded(self) -> ReferenceKV:
        """The cache that the first complete forward recorded."""
        if not self.record or len(self.keys) != len(self.blocks):
            raise RuntimeError("no complete forward has recorded the reference cache")
        return ReferenceKV(self.keys, self.values, tuple(self.grid))

    def attend(self, attn, video_states, video_rotary_emb, backend):
        index = self.block_index[id(attn)]
        block, loras = self.blocks[index], self.adapter.blocks[index].self_attn
        batch = video_states.shape[0]
        if index == 0:  # a new forward starts: the reference tokens enter the first block
            if self.embedded is None:
                self.embedded = _embed_reference(self.transformer, self.adapter, self.reference_latents, self.grid)
            tokens = self.embedded[0]
            # Restricted: one reference for the whole batch. Vanilla: each sample's reference sees its own video.
            self.hidden = tokens.expand(batch, -1, -1) if self.adapter.attention == "vanilla" else tokens
        _, rotary_emb, modulation = self.embedded
        ref_query, ref_key, ref_value = _reference_qkv(block, loras, self.hidden, modulation, rotary_emb)
        if self.record and len(self.keys) == index:
            self.keys.append(ref_key)
            self.values.append(ref_value)
        query, key, value = project_qkv(attn, video_states, video_rotary_emb)
        key = torch.cat([key, ref_key.expand(batch, -1, -1, -1).type_as(key)], dim=1)
        value = torch.cat([value, ref_value.expand(batch, -1, -1, -1).type_as(value)], dim=1)
        if index < len(self.blocks) - 1:
            if self.adapter.attention == "vanilla":
                ref_out = attention_output(attn, ref_query, key, value, backend)
            else:
                ref_out = attention_output(attn, ref_query, ref_key, ref_value, backend)
            self.hidden = _reference_update(block, self.hidden, ref_out, modulation)
        return attention_output(attn, query, key, value, backend)


@contextmanager
def joint_reference_context(transformer: nn.Module, adapter: StandInAdapter, reference_latents, grid,
                            record: bool = False):
    """Every forward inside computes the reference stream along with the video (no cache); with record=True the
    first forward also records the cache (the context's `recorded`), for use with reference_context afterwards."""
    if torch.is_grad_enabled() and transformer.gradient_checkpointing:
        raise RuntimeError("the joint reference stream keeps state across blocks: disable gradient checkpointing")
    joint = JointReference(transformer, adapter, reference_latents, grid, record)
    processors = _reference_processors(transformer)
    _check_idle(processors)
    try:
        for processor in processors:
            processor.joint = joint
        yield joint
    finally:
        for processor in processors:
            processor.joint = None
