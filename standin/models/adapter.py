"""The Stand-In adapter: low-rank deltas on the reference stream's Q/K/V projections, one set per block.

The module tree mirrors the published checkpoint, so `adapter.state_dict()` has exactly the official key names:
    blocks.{i}.self_attn.{q,k,v}_loras.down.weight   [rank, dim]   (A)
    blocks.{i}.self_attn.{q,k,v}_loras.up.weight     [dim, rank]   (B)
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_RANK = 128


class LoRA(nn.Module):
    """delta(x) = B A x, computed in float32 whatever the storage dtype and any autocast around it."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A normal with standard deviation 1/rank (the published code's initialisation), B = 0: an untrained
        # adapter adds nothing to the projections.
        nn.init.normal_(self.down.weight, std=1.0 / self.down.out_features)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(F.linear(x.float(), self.down.weight.float()), self.up.weight.float())


class SelfAttentionLoRAs(nn.Module):
    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.q_loras = LoRA(dim, rank)
        self.k_loras = LoRA(dim, rank)
        self.v_loras = LoRA(dim, rank)


class BlockAdapter(nn.Module):
    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.self_attn = SelfAttentionLoRAs(dim, rank)


ATTENTION_MODES = ("restricted", "vanilla")
POSITION_MODES = ("shifted", "shared")


class StandInAdapter(nn.Module):
    """All of Stand-In's new weights for one base transformer (one expert, for Wan2.2).

    attention and positions name the variant the weights were trained for: the method is ("restricted",
    "shifted"); ("vanilla", ...) lets reference queries see the video, and (..., "shared") puts the reference on
    the video's own grid at time 0 -- the paper's two ablations, kept to measure them.
    """

    def __init__(self, dim: int, num_layers: int, rank: int = DEFAULT_RANK, attention: str = "restricted",
                 positions: str = "shifted"):
        super().__init__()
        if attention not in ATTENTION_MODES or positions not in POSITION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES} and positions one of {POSITION_MODES}")
        self.dim, self.num_layers, self.rank = dim, num_layers, rank
        self.attention, self.positions = attention, positions
        self.blocks = nn.ModuleList(BlockAdapter(dim, rank) for _ in range(num_layers))

    @classmethod
    def for_transformer(cls, transformer, rank: int = DEFAULT_RANK, **variant) -> "StandInAdapter":
        """An untrained adapter sized for a diffusers WanTransformer3DModel, on its device, in float32."""
        config = transformer.config
        dim = config.num_attention_heads * config.attention_head_dim
        device = transformer.patch_embedding.weight.device
        with torch.device(device):
            return cls(dim, config.num_layers, rank, **variant)
