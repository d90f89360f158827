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
        # A ~ N(0, 1/rank), B = 0: an untrained adapter adds nothing to the projections.
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


class StandInAdapter(nn.Module):
    """All of Stand-In's new weights for one base transformer (one expert, for Wan2.2)."""

    def __init__(self, dim: int, num_layers: int, rank: int = DEFAULT_RANK):
        super().__init__()
        self.dim, self.num_layers, self.rank = dim, num_layers, rank
        self.blocks = nn.ModuleList(BlockAdapter(dim, rank) for _ in range(num_layers))

    @classmethod
    def for_transformer(cls, transformer, rank: int = DEFAULT_RANK) -> "StandInAdapter":
        """An untrained adapter sized for a diffusers WanTransformer3DModel, on its device, in float32."""
        config = transformer.config
        dim = config.num_attention_heads * config.attention_head_dim
        device = transformer.patch_embedding.weight.device
        with torch.device(device):
            return cls(dim, config.num_layers, rank)
