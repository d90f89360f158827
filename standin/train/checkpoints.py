"""Run-folder checkpoints: what a killed run needs to continue as if it had never stopped.

RUN_DIR/checkpoints/step-NNNNNNN/adapter.safetensors   the adapter (standin.checkpoint format, loads anywhere)
RUN_DIR/checkpoints/step-NNNNNNN/training_state.pt     optimizer, LR schedule, step, RNG states, data position
RUN_DIR/checkpoints/latest.json                        which checkpoint is complete and newest

Each file is written atomically and latest.json is replaced only after both files of a checkpoint are complete,
so a kill at any moment leaves latest.json naming a complete checkpoint: at most the steps since it are lost.
"""

import json
import random
import shutil
from pathlib import Path

import torch

from standin.checkpoint import save_adapter
from standin.io import atomic_write, save_text

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "training_state.pt"


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    return Path(run_dir) / CHECKPOINTS / json.loads(pointer.read_text())["folder"]


def rng_states() -> dict:
    """Global generators (the stream itself is seeded per sample; these cover anything else that draws)."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def write_checkpoint(run_dir: Path, step: int, adapter_state: dict, training_state: dict, metadata: dict,
                     keep: int) -> Path:
    """Write a complete checkpoint, then point latest.json at it, then remove all but the newest `keep`."""
    folder = checkpoint_folder(run_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    save_adapter(adapter_state, folder / ADAPTER_FILE, metadata={**metadata, "step": str(step)})
    atomic_write(folder / STATE_FILE, lambda temporary: torch.save(training_state, temporary))
    pointer = {"folder": folder.name, "step": step}
    save_text(json.dumps(pointer), Path(run_dir) / CHECKPOINTS / LATEST)
    older = sorted(p for p in folder.parent.glob("step-*") if p.is_dir() and p.name < folder.name)
    for stale in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(stale)
    return folder


def read_training_state(folder: Path) -> dict:
    # Only tensors and plain containers are stored: the safe unpickler suffices.
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
