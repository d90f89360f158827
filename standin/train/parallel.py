"""Sharding model and optimizer over processes (FSDP2, `--fsdp`): for a base too large to replicate on every GPU.

Units. accelerate's FSDP plugin (and the usual recipe) makes one unit per transformer block, whose parameters
are gathered when the block's forward runs. Stand-In's reference stream does not run blocks' forwards: it calls
each block's layers itself (standin.models.reference.encode_reference), and validation runs the inner
transformer through the pipeline, outside the wrapper. So the units here are the layers that are always
called through their own forward: every Linear and Conv3d of the base (99.99% of its parameters) and every LoRA
of the adapter. The rest (norm weights, modulation tables; all frozen) stays replicated: frozen, it never
needs a gradient reduction. The StandInTransformer is the root unit: it owns no parameters, but makes the
layers reshard after their forward (FSDP keeps a root's own parameters gathered) and orders the hooks.
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
    """Shard a StandInTransformer in place over all processes (see the module docstring), then move it to `device`."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = [m for m in model.transformer.modules() if isinstance(m, (nn.Linear, nn.Conv3d))]
    units += [m for m in model.adapter.modules() if isinstance(m, LoRA)]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    sharded = {id(p) for unit in units for p in unit.parameters()}
    fully_shard(model, mesh=mesh, ignored_params={p for p in model.parameters() if id(p) not in sharded})
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
