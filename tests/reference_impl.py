"""A second implementation of Stand-In (docs/method.md sections 2-3), in plain PyTorch, for the tests.

It shares no code with the package or with diffusers' blocks: it reads the raw weights of a diffusers
WanTransformer3DModel state dict and computes the JOINT forward of the paper, video and reference tokens in one
sequence with a restricted attention mask and per-token modulation, RoPE from explicit angles. The package
computes the reference stream separately and caches it; agreement between the two checks the method itself.
Several references (a list) follow the published multi-identity scheme: reference k at positions
(-1, h + k h_r + j, w + k w_r + l), its queries seeing only its own keys, video queries seeing all.
"""

import math

import torch
import torch.nn.functional as F


def _linear(weights, name, x):
    return F.linear(x, weights[f"{name}.weight"], weights.get(f"{name}.bias"))


def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _layer_norm(x, eps, weight=None, bias=None):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """positions [L, 3] (time, height, width) -> rotation angle of each channel pair [L, head_dim / 2]."""
    axis_dim = 2 * (head_dim // 6)
    dims = [head_dim - 2 * axis_dim, axis_dim, axis_dim]
    angles = []
    for axis, dim in enumerate(dims):
        inverse_frequency = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(positions[:, axis, None].double() * inverse_frequency)
    return torch.cat(angles, dim=-1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D]: channel pairs (2i, 2i+1) as complex numbers, multiplied by exp(i * angle)."""
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


def grid_positions(frames, height, width, time_offset=0, height_offset=0, width_offset=0):
    f, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([f + time_offset, h + height_offset, w + width_offset], dim=-1).reshape(-1, 3)


def _time_projection(weights, timestep, freq_dim):
    half = freq_dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    arguments = timestep.float()[:, None] * frequencies[None]
    sinusoid = torch.cat([torch.cos(arguments), torch.sin(arguments)], dim=-1)
    temb = _linear(weights, "condition_embedder.time_embedder.linear_2",
                   F.silu(_linear(weights, "condition_embedder.time_embedder.linear_1", sinusoid)))
    return temb, _linear(weights, "condition_embedder.time_proj", F.silu(temb)).unflatten(1, (6, -1))


def _attention(q, k, v, mask=None):
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def _self_attention(weights, p, normed, angles, mask, heads, head_dim, eps, loras=None, is_reference=None):
    """Block `p`'s self-attention on modulated tokens; with `loras`, the reference tokens' projections add
    their LoRA. Returns the attention output (before the gate) and the rotated keys and values."""
    projected = {}
    for name in "qkv":
        out = _linear(weights, f"{p}.attn1.to_{name}", normed)
        if loras is not None:
            a, b = loras[f"{name}_loras.down.weight"], loras[f"{name}_loras.up.weight"]
            out = out + (normed @ a.T @ b.T) * is_reference[None, :, None]
        projected[name] = out
    q = _rms_norm(projected["q"], weights[f"{p}.attn1.norm_q.weight"], eps).unflatten(2, (heads, head_dim))
    k = _rms_norm(projected["k"], weights[f"{p}.attn1.norm_k.weight"], eps).unflatten(2, (heads, head_dim))
    v = projected["v"].unflatten(2, (heads, head_dim))
    q, k = rotate(q, angles), rotate(k, angles)
    return _linear(weights, f"{p}.attn1.to_out.0", _attention(q, k, v, mask).flatten(2)), (k, v)


def _text_attention(weights, p, x, context, heads, head_dim, eps):
    normed = _layer_norm(x, eps, weights.get(f"{p}.norm2.weight"), weights.get(f"{p}.norm2.bias"))
    q = _rms_norm(_linear(weights, f"{p}.attn2.to_q", normed), weights[f"{p}.attn2.norm_q.weight"], eps)
    k = _rms_norm(_linear(weights, f"{p}.attn2.to_k", context), weights[f"{p}.attn2.norm_k.weight"], eps)
    v = _linear(weights, f"{p}.attn2.to_v", context)
    attended = _attention(*(t.unflatten(2, (heads, head_dim)) for t in (q, k, v))).flatten(2)
    return _linear(weights, f"{p}.attn2.to_out.0", attended)


def _feed_forward(weights, p, normed):
    return _linear(weights, f"{p}.ffn.net.2", F.gelu(_linear(weights, f"{p}.ffn.net.0.proj", normed),
                                                      approximate="tanh"))


def _vace_hints(weights, video, control, modulation, angles, context, config):
    """VACE's control branch (Wan VACE): the control latents embedded, added to the video tokens, and run through
    the VACE blocks on video positions alone; each block's output projection is the hint for its main block."""
    heads, head_dim, eps = config["num_attention_heads"], config["attention_head_dim"], config["eps"]
    c = F.conv3d(control, weights["vace_patch_embedding.weight"], weights["vace_patch_embedding.bias"],
                 stride=(1, 2, 2)).flatten(2).transpose(1, 2)
    c = _linear(weights, "vace_blocks.0.proj_in", c) + video
    hints = []
    for i in range(len(config["vace_layers"])):
        p = f"vace_blocks.{i}"
        shift, scale, gate, ff_shift, ff_scale, ff_gate = (weights[f"{p}.scale_shift_table"] + modulation).unbind(1)
        attended, _ = _self_attention(weights, p, _layer_norm(c, eps) * (1 + scale[:, None]) + shift[:, None],
                                      angles, None, heads, head_dim, eps)
        c = c + attended * gate[:, None]
        c = c + _text_attention(weights, p, c, context, heads, head_dim, eps)
        c = c + _feed_forward(weights, p, _layer_norm(c, eps) * (1 + ff_scale[:, None]) + ff_shift[:, None]) * \
            ff_gate[:, None]
        hints.append(_linear(weights, f"{p}.proj_out", c))
    return hints


def standin_forward(weights, config, adapter_weights, latents, timestep, text, reference_latents=None,
                    restricted=True, shared_positions=False, return_reference_kv=False, control=None,
                    control_scale=1.0):
    """Joint Stand-In forward. weights: base state dict; adapter_weights: official-name LoRA state dict.
    restricted=False is the paper's "vanilla self-attention" ablation (reference queries see the video too);
    shared_positions=True its other ablation (reference at positions (0, j, k) on the video's grid).
    control: a Wan VACE base's control latents; their hints are added to the video tokens after the main blocks
    config["vace_layers"] names (the reference tokens never enter the VACE blocks)."""
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    eps = config["eps"]
    batch, _, frames, height, width = latents.shape
    f, h, w = frames, height // 2, width // 2

    def embed(x):
        tokens = F.conv3d(x, weights["patch_embedding.weight"], weights["patch_embedding.bias"], stride=(1, 2, 2))
        return tokens.flatten(2).transpose(1, 2)

    video = embed(latents)
    positions = grid_positions(f, h, w)
    num_video = video.shape[1]
    temb, mod_t = _time_projection(weights, timestep, config["freq_dim"])
    context = _linear(weights, "condition_embedder.text_embedder.linear_2", F.gelu(
        _linear(weights, "condition_embedder.text_embedder.linear_1", text), approximate="tanh"))
    hints = [] if control is None else _vace_hints(weights, video, control, mod_t, rope_angles(positions, head_dim),
                                                   context, config)

    group = torch.full((num_video,), -1)  # -1: video; k: reference k
    if reference_latents is None:
        x = video
        modulation = mod_t[:, None].expand(-1, num_video, -1, -1)
    else:
        references = reference_latents if isinstance(reference_latents, (list, tuple)) else [reference_latents]
        tokens = [embed(r).expand(batch, -1, -1) for r in references]
        for k, r in enumerate(references):
            ref_h, ref_w = r.shape[-2] // 2, r.shape[-1] // 2
            offsets = (0, 0, 0) if shared_positions else (-1, h + k * ref_h, w + k * ref_w)
            positions = torch.cat([positions, grid_positions(1, ref_h, ref_w, *offsets)])
            group = torch.cat([group, torch.full((ref_h * ref_w,), k)])
        x = torch.cat([video, *tokens], dim=1)
        _, mod_0 = _time_projection(weights, torch.zeros(batch), config["freq_dim"])
        modulation = torch.cat([mod_t[:, None].expand(-1, num_video, -1, -1),
                                mod_0[:, None].expand(-1, x.shape[1] - num_video, -1, -1)], dim=1)
    is_reference = group >= 0
    angles = rope_angles(positions, head_dim)
    # mask[query, key]: each reference's queries see its own keys only; video queries see everything.
    mask = (group[:, None] < 0) | (group[:, None] == group[None, :]) if restricted else None

    reference_kv = []
    for i in range(config["num_layers"]):
        p = f"blocks.{i}"
        table = weights[f"{p}.scale_shift_table"][:, None] + modulation  # [B, L, 6, D]
        shift, scale, gate, ff_shift, ff_scale, ff_gate = table.unbind(2)

        loras = None if reference_latents is None else {
            name.removeprefix(f"blocks.{i}.self_attn."): value for name, value in adapter_weights.items()
            if name.startswith(f"blocks.{i}.self_attn.")}
        attended, (k, v) = _self_attention(weights, p, _layer_norm(x, eps) * (1 + scale) + shift, angles, mask,
                                           heads, head_dim, eps, loras, is_reference)
        reference_kv.append((k[:, num_video:], v[:, num_video:]))
        x = x + attended * gate

        # Cross-attention to the text: video tokens only.
        video_part = x[:, :num_video]
        video_part = video_part + _text_attention(weights, p, video_part, context, heads, head_dim, eps)
        x = torch.cat([video_part, x[:, num_video:]], dim=1)

        x = x + _feed_forward(weights, p, _layer_norm(x, eps) * (1 + ff_scale) + ff_shift) * ff_gate
        if i in config.get("vace_layers", ()) and hints:
            hint = hints[list(config["vace_layers"]).index(i)] * control_scale
            x = torch.cat([x[:, :num_video] + hint, x[:, num_video:]], dim=1)

    shift, scale = (weights["scale_shift_table"] + temb[:, None]).unbind(1)
    out = _linear(weights, "proj_out", _layer_norm(x[:, :num_video], eps) * (1 + scale[:, None]) + shift[:, None])
    out = out.reshape(batch, f, h, w, 1, 2, 2, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    out = out.reshape(batch, -1, frames, height, width)
    return (out, reference_kv) if return_reference_kv else out
