"""Stand-In's reference stream on diffusers' WanTransformer3DModel: the whole method, top to bottom.

The method (docs/method.md; paper sections 3.2-3.4): reference tokens travel beside the video tokens through
every block. They come from the base's own patch embedding, are modulated as a clean image (timestep 0), add a
LoRA delta to their Q/K/V projections before the q/k RMS norm, sit at RoPE positions (-1, h + j, w + k), attend
only to themselves, and skip the text cross-attention. Video queries attend to [video; reference] keys.
Reference queries never see the video, so the reference keys/values of every block are the same in every
forward of a generation: they are computed once and cached.

How it plugs into diffusers (the design, weighed against the alternative):
- Two idioms were possible: a Wan model class whose blocks carry both streams explicitly (as diffusers'
  WanVACETransformer3DModel does for its control stream), or attention processors (as diffusers' IP-Adapter).
  The first forks the block's forward: every diffusers upgrade of the Wan block would have to be re-copied, and it
  would not plug into the transformers users already have (Wan2.1, both Wan2.2 experts, VACE) without converting
  them. Processors plug into any of them, so Stand-In is processors, on ONE path:
- Each block's self-attention processor, when a `ReferenceStream` is attached, runs the reference tokens through
  that same block, with the block's own (diffusers') forward at timestep-0 modulation, before it attends for the
  video. In that nested call the self-attention processor does the reference's restricted attention with LoRA
  and records its keys/values, and the cross-attention processor adds nothing (x + 0 is exact). Diffusers'
  norm, modulation and feed-forward math is therefore used as is, never re-written here.
- Everything runs inside the blocks' forwards, so whatever diffusers hooks onto a block sees the reference work
  too: group offloading (block and leaf level), model CPU offload, layerwise fp8 casting, FSDP units per
  block, torch.compile of repeated blocks, and gradient checkpointing (the recomputation of block i finds the
  stream's state for block i unchanged, because that state is indexed by block).
- cache=True: the first forward records each block's reference keys/values; later forwards only read them.
  cache=False recomputes them in every forward (training, where gradients flow through them; the vanilla
  ablation, where they depend on the video). Same code either way.

Diffusers internals relied on (each checked by tests/test_diffusers_contract.py, so an upgrade fails loudly):
  WanTransformer3DModel: .blocks, .patch_embedding, .rope (patch_size, t_dim, max_seq_len, forward -> cos, sin
    [1, L, 1, D]), .condition_embedder (timesteps_proj, time_embedder, act_fn, time_proj), .config.patch_size
  WanTransformerBlock.forward(hidden_states, encoder_hidden_states, temb [B, 6, dim], rotary_emb), calling
    attn1(x, None, None, rotary_emb) and attn2(x, encoder_hidden_states, None, None) and adding attn2's output
  WanAttention: to_q/to_k/to_v (or to_qkv when fused_projections), norm_q, norm_k, heads, to_out[0], to_out[1]
  processors: __call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb), and the
    _attention_backend / _parallel_config attributes that set_attention_backend / context parallelism set
  diffusers.models.attention_dispatch.dispatch_attention_fn(query, key, value, backend=...) on [B, L, H, D]
"""

from contextlib import contextmanager

import torch
import torch.nn as nn
from diffusers.models.attention_dispatch import dispatch_attention_fn

from standin.models.adapter import StandInAdapter


# ---- positions ----------------------------------------------------------------------------------------------
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2d, 2d+1) of x [B, L, H, D] by the angles whose cos/sin (repeated per pair)
    are given as [1, L, 1, D], the layout of diffusers' WanRotaryPosEmbed. Math in float32, as Wan does.

    As one complex product per pair (Wan's own formulation): on CPU about 4x faster than rotating the even and
    odd channels separately, and equal to it up to float32 rounding."""
    rotation = torch.complex(cos[..., 0::2].float(), sin[..., 0::2].float())
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def reference_rope(rope: nn.Module, reference_grid: tuple[int, int], video_grid: tuple[int, int, int],
                   positions: str = "shifted", slot: int = 0, context_parallel: bool = False):
    """cos/sin tables [1, h_r * w_r, 1, head_dim] for reference token (j, k) at positions (-1, h + j, w + k), or
    at (0, j, k) on the video's own grid for positions="shared" (the ablation that loses identity). With several
    references, the one in `slot` s sits one reference grid further diagonally per slot: (-1, h + s h_r + j,
    w + s w_r + k), so that no two references share positions (the published multi-identity scheme).

    Cut from the base model's own tables, through its RoPE module's forward on a shape-only input, so that
    offloading hooks bring its buffers; under context parallelism the module's hook would shard the tables, so the
    class's forward is called instead. Position -1 is the rotation by -theta, i.e. (cos, -sin) of time 1.
    """
    _, video_h, video_w = video_grid
    ref_h, ref_w = reference_grid
    time_row, h0, w0 = (1, video_h + slot * ref_h, video_w + slot * ref_w) if positions == "shifted" else (0, 0, 0)
    if h0 + ref_h > rope.max_seq_len or w0 + ref_w > rope.max_seq_len:
        raise ValueError(
            f"reference positions reach {max(h0 + ref_h, w0 + ref_w)}, beyond the base model's RoPE table of "
            f"{rope.max_seq_len} positions: the video grid {video_h}x{video_w} with {slot + 1} reference(s) of "
            f"{ref_h}x{ref_w} tokens is too large for this model"
        )
    grid = (time_row + 1, h0 + ref_h, w0 + ref_w)
    p_t, p_h, p_w = rope.patch_size
    shape_only = torch.zeros(()).expand(1, 1, grid[0] * p_t, grid[1] * p_h, grid[2] * p_w)
    cos, sin = [table.reshape(*grid, -1)[time_row, h0:, w0:].reshape(1, ref_h * ref_w, 1, -1)
                for table in (type(rope).forward(rope, shape_only) if context_parallel else rope(shape_only))]
    if positions == "shifted":
        sin = torch.cat([-sin[..., : rope.t_dim], sin[..., rope.t_dim :]], dim=-1)
    return cos, sin


def video_grid(transformer: nn.Module, latent_shape) -> tuple[int, int, int]:
    """Post-patch token grid (frames, height, width) of a latent video [B, C, F, H, W]."""
    p_t, p_h, p_w = transformer.config.patch_size
    return latent_shape[2] // p_t, latent_shape[3] // p_h, latent_shape[4] // p_w


# ---- attention ----------------------------------------------------------------------------------------------
def project_qkv(attn: nn.Module, x: torch.Tensor, rotary_emb, loras: nn.Module | None = None):
    """Q, K, V [B, L, heads, head_dim] of a WanAttention self-attention; for reference tokens the LoRA deltas are
    added BEFORE the q/k RMS norm (in float32, as the published adapters were trained)."""
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
    return apply_rope(query, *rotary_emb), apply_rope(key, *rotary_emb), value


def attend(attn: nn.Module, query, key, value, backend, parallel_config=None) -> torch.Tensor:
    """Attention and the block's output projection (the same projection serves both streams)."""
    hidden_states = dispatch_attention_fn(query, key, value, backend=backend, parallel_config=parallel_config)
    hidden_states = hidden_states.flatten(2, 3).type_as(query)
    return attn.to_out[1](attn.to_out[0](hidden_states))


def concat_reference(key, value, reference_kv, shard: tuple[int, int] = (0, 1)):
    """[video; reference] keys and values; one reference serves every sample of the batch.

    Under context parallelism (shard = (rank, ranks)) each rank holds a slice of the video tokens, and diffusers
    gathers every rank's keys (Ulysses all-to-all) or passes them round (ring): each rank appends its own slice of
    the reference keys, so that every video query sees each reference key exactly once (attention does not depend
    on the order of the keys)."""
    ref_key, ref_value = reference_kv
    rank, ranks = shard
    if ranks > 1:
        if ref_key.shape[1] % ranks:
            raise ValueError(f"{ref_key.shape[1]} reference tokens do not split evenly over {ranks} context-parallel "
                             "ranks")
        ref_key, ref_value = ref_key.chunk(ranks, dim=1)[rank], ref_value.chunk(ranks, dim=1)[rank]
    batch = key.shape[0]
    key = torch.cat([key, ref_key.expand(batch, -1, -1, -1).type_as(key)], dim=1)
    return key, torch.cat([value, ref_value.expand(batch, -1, -1, -1).type_as(value)], dim=1)


def context_parallel_shard(parallel_config) -> tuple[int, int]:
    """(this rank, number of ranks) over which diffusers' context parallelism shards the video tokens."""
    config = getattr(parallel_config, "context_parallel_config", None)
    if config is None:
        return 0, 1
    return config._flattened_mesh.get_local_rank(), config.ring_degree * config.ulysses_degree


# ---- the stream ---------------------------------------------------------------------------------------------
class ReferenceStream:
    """The reference tokens through the blocks of one transformer, for the forwards of one generation (or one
    training step). One reference image, or several (each with its own tokens, positions and restricted attention;
    video queries see all of them). State is indexed by block: tokens[r][i] enters block i for reference r,
    keys_values[i] (all references' keys/values, concatenated) leaves it."""

    def __init__(self, transformer: nn.Module, adapter: StandInAdapter, reference_latents, grid: tuple[int, int, int],
                 cache: bool = True):
        if len(adapter.blocks) != len(transformer.blocks):
            raise ValueError(f"adapter has {len(adapter.blocks)} blocks, the transformer {len(transformer.blocks)}")
        if cache and adapter.attention != "restricted":
            raise ValueError("only restricted attention makes the reference independent of the video: nothing to cache")
        latents = [reference_latents] if torch.is_tensor(reference_latents) else list(reference_latents)
        if not latents:
            raise ValueError("no reference latents given")
        if len(latents) > 1 and adapter.positions != "shifted":
            raise ValueError("shared positions put every reference on the video's own grid: one reference only")
        self.transformer, self.adapter, self.latents, self.cache = transformer, adapter, latents, cache
        self.grid = tuple(grid)  # the video's post-patch (frames, height, width): the reference positions follow it
        n = len(transformer.blocks)
        self.tokens: list[list[torch.Tensor | None]] = [[None] * n for _ in latents]
        self.keys_values: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n
        self.rotary_emb: list = [None] * len(latents)
        self.modulation = None
        self.in_reference_pass = False  # True while a block runs on reference tokens
        self.video_kv = None  # vanilla ablation: the video keys/values the reference queries also see
        self.latest_kv = None  # what the self-attention of the reference pass in progress produced
        self.is_muted = False  # forwards inside muted() run the base model (reference guidance's third branch)
        self.shards = 1  # context-parallel ranks the video tokens are split over

    @property
    def recorded(self) -> bool:
        return self.cache and all(kv is not None for kv in self.keys_values)

    @contextmanager
    def muted(self):
        """Forwards inside see no reference (the base model), while the stream and its cache stay alive."""
        self.is_muted = True
        try:
            yield
        finally:
            self.is_muted = False

    def _embed(self, batch: int) -> None:
        """Reference tokens (the base's own patch embedding), their positions and the timestep-0 modulation. Made
        in block 0's forward, where offloading hooks have brought the weights."""
        transformer = self.transformer
        dtype = transformer.patch_embedding.weight.dtype
        for slot, latents in enumerate(self.latents):
            x = transformer.patch_embedding(latents.to(dtype))
            reference_grid = tuple(x.shape[3:])
            x = x.flatten(2).transpose(1, 2).contiguous()
            # The vanilla ablation lets each sample's reference see its own video: one reference per sample then.
            self.tokens[slot][0] = x.expand(batch, -1, -1) if self.adapter.attention == "vanilla" else x
            rotary = reference_rope(transformer.rope, reference_grid, self.grid, self.adapter.positions, slot,
                                    self.shards > 1)
            self.rotary_emb[slot] = tuple(t.to(x.device) for t in rotary)
        embedder = transformer.condition_embedder  # its own steps, at t = 0 (the reference is a clean image)
        t0 = embedder.timesteps_proj(torch.zeros(1, device=x.device))
        temb = embedder.time_embedder(t0.to(next(embedder.time_embedder.parameters()).dtype)).to(dtype)
        self.modulation = embedder.time_proj(embedder.act_fn(temb)).unflatten(1, (6, -1))

    def reference_kv(self, index: int, block: nn.Module, block_forward, video_kv,
                     shards: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `index`'s reference keys/values: from the cache, or by running the block on reference tokens (the
        whole reference on every rank under context parallelism: it is small, and never sharded)."""
        video_tokens = video_kv[0].shape[1] * shards
        if video_tokens != self.grid[0] * self.grid[1] * self.grid[2]:
            raise ValueError(f"the reference positions were built for video grid {self.grid}, but this input has "
                             f"{video_tokens} video tokens")
        if self.keys_values[index] is not None and self.cache:
            return self.keys_values[index]
        if index == 0:
            self.shards = shards
            self._embed(video_kv[0].shape[0])
        keys, values = [], []
        for tokens, rotary_emb in zip(self.tokens, self.rotary_emb):
            self.in_reference_pass, self.video_kv = True, video_kv
            try:  # the class's forward: the hooks on this block instance already ran for the video call we are in
                output = block_forward(block, tokens[index], None, self.modulation, rotary_emb)
            finally:
                self.in_reference_pass, self.video_kv = False, None
            if index + 1 < len(tokens):
                tokens[index + 1] = output
            if not torch.is_grad_enabled():  # only backward (checkpointing's recomputation) reads it again
                tokens[index] = None
            keys.append(self.latest_kv[0])
            values.append(self.latest_kv[1])
        self.latest_kv = None
        self.keys_values[index] = (keys[0], values[0]) if len(keys) == 1 else (torch.cat(keys, 1), torch.cat(values, 1))
        return self.keys_values[index]


class StandInSelfAttention:
    """A block's self-attention: the base processor without a stream; with one, [video; reference] keys for
    video queries, and for reference tokens (in the stream's nested block call) LoRA and restricted attention."""

    def __init__(self, base_processor, block: nn.Module, index: int):
        self.base_processor, self.block, self.index = base_processor, block, index
        self.block_forward = type(block).forward  # a plain function, which torch.compile can trace
        self.stream: ReferenceStream | None = None

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
        stream = self.stream
        if stream is None or stream.is_muted:
            return self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the Stand-In reference only extends self-attention without a mask")
        if stream.in_reference_pass:
            return self._reference_attention(attn, hidden_states, rotary_emb, stream)
        query, key, value = project_qkv(attn, hidden_states, rotary_emb)
        parallel, shard = self._parallel_config, context_parallel_shard(self._parallel_config)
        if shard[1] > 1 and stream.adapter.attention != "restricted":
            raise NotImplementedError("the vanilla-attention ablation does not run under context parallelism")
        reference_kv = stream.reference_kv(self.index, self.block, self.block_forward, (key, value), shard[1])
        key, value = concat_reference(key, value, reference_kv, shard)
        return attend(attn, query, key, value, self._attention_backend, parallel)

    def _reference_attention(self, attn, reference_states, rotary_emb, stream: ReferenceStream):
        loras = stream.adapter.blocks[self.index].self_attn
        query, key, value = project_qkv(attn, reference_states, rotary_emb, loras)
        if stream.cache:
            key, value = key.detach(), value.detach()
        stream.latest_kv = (key, value)
        if stream.adapter.attention == "vanilla":  # the ablation: reference queries see the video too
            video_key, video_value = stream.video_kv
            key, value = torch.cat([video_key, key], dim=1), torch.cat([video_value, value], dim=1)
        return attend(attn, query, key, value, self._attention_backend)


class StandInCrossAttention:
    """A block's text cross-attention: reference tokens skip it (their residual adds zero, exactly)."""

    def __init__(self, base_processor, stream_of):
        self.base_processor, self._stream_of = base_processor, stream_of

    _attention_backend = StandInSelfAttention._attention_backend
    _parallel_config = StandInSelfAttention._parallel_config

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        stream = self._stream_of.stream
        if stream is not None and stream.in_reference_pass:
            return torch.zeros_like(hidden_states)
        return self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


# ---- attaching ----------------------------------------------------------------------------------------------
def install_reference_attention(transformer: nn.Module) -> None:
    """Wrap every block's attention processors once (idempotent); without a stream they are the base ones."""
    for index, block in enumerate(transformer.blocks):
        if not isinstance(block.attn1.processor, StandInSelfAttention):
            block.attn1.processor = StandInSelfAttention(block.attn1.processor, block, index)
        if not isinstance(block.attn2.processor, StandInCrossAttention):
            block.attn2.processor = StandInCrossAttention(block.attn2.processor, block.attn1.processor)


def _processors(transformer: nn.Module) -> list[StandInSelfAttention]:
    processors = [block.attn1.processor for block in transformer.blocks]
    crosses = [block.attn2.processor for block in transformer.blocks]
    if not all(isinstance(p, StandInSelfAttention) for p in processors) or not all(
            isinstance(p, StandInCrossAttention) for p in crosses):
        raise RuntimeError(
            "this transformer's attention processors were replaced after Stand-In was installed "
            "(e.g. by set_attn_processor); call install_reference_attention(transformer) again"
        )
    return processors


@contextmanager
def reference_stream(transformer: nn.Module, adapter: StandInAdapter, reference_latents,
                     grid: tuple[int, int, int], cache: bool = True):
    """Every forward of `transformer` inside, on videos of post-patch `grid` (video_grid()), sees the reference:
    normalised VAE latents [1 or B, C, 1, H, W], or a list of them for several identities. On exit, also on an
    exception, it is the base model again and the cache is gone."""
    install_reference_attention(transformer)
    processors = _processors(transformer)
    if any(p.stream is not None for p in processors):
        raise RuntimeError("a reference is already active on this transformer; nested generations are not supported")
    stream = ReferenceStream(transformer, adapter, reference_latents, grid, cache)
    try:
        for processor in processors:
            processor.stream = stream
        yield stream
    finally:
        for processor in processors:
            processor.stream = None
