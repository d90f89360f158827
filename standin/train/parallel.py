"""Sharding model and optimizer over processes (FSDP2, `--fsdp`): for a base too large to replicate on every GPU.

Units, as accelerate's FSDP plugin and the usual recipe make them: one per transformer block (the reference stream
runs inside each block's forward, so a block's parameters are gathered for both streams at once), the rest of the
transformer (patch and condition embeddings, output head: gathered when the pipeline calls the transformer
directly, as validation does), and each LoRA of the adapter (called through its own forward inside its block).
The StandInModel is the root unit; it owns no parameters of its own.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from standin.models.adapter import LoRA


def shard_model(model: nn.Module, device: torch.device) -> None:
    """Shard a StandInModel in place over all processes (see the module docstring), then move it to `device`."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in [*model.transformer.blocks, *(m for m in model.adapter.modules() if isinstance(m, LoRA))]:
        fully_shard(unit, mesh=mesh)
    fully_shard(model.transformer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to(device)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with sharded tensors gathered (a collective: every process must call it), on CPU."""
    return {key: (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
            for key, value in module.state_dict().items()}


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer's full state keyed by parameter names, so that a checkpoint does not depend on how many
    processes wrote it (a collective when sharded; the main process gets the state)."""
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict, sharded: bool) -> None:
    """Load a state from optimizer_state(); when sharded, every process keeps its own shard of it."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=sharded))
