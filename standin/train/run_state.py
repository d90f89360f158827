"""Run-folder checkpoints: what a killed run needs to continue as if it had never stopped.

RUN_DIR/checkpoints/step-NNNNNNN/adapter.safetensors   the adapter (standin.checkpoint format, loads anywhere)
RUN_DIR/checkpoints/step-NNNNNNN/training_state.pt     optimizer, LR schedule, step, RNG states, data position
RUN_DIR/checkpoints/latest.json                        which checkpoint is complete and newest
RUN_DIR/adapter.safetensors                            the finished run's adapter (adapter_high / adapter_low
                                                       .safetensors for a Wan2.2 expert: final_adapter_file)

Each file is written atomically and latest.json is replaced only after both files of a checkpoint are complete,
so a kill at any moment leaves latest.json naming a complete checkpoint: at most the steps since it are lost.
Without latest.json (a kill during the first checkpoint, or a user who removed a damaged one) the newest folder
holding both files is the latest: both are written atomically, the state last, so both present means complete.

A damaged latest.json or training_state.pt (truncated, garbage, wrong keys) raises CheckpointError, one line
that names the file and says what to remove to fall back to the newest older complete checkpoint.
"""

import json
import os
import random
import shutil
import socket
import time
from pathlib import Path

import torch

from standin.checkpoint import save_adapter
from standin.io import atomic_write, save_text

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "training_state.pt"
STATE_KEYS = ("step", "optimizer", "lr_scheduler", "rng", "config")


def final_adapter_file(expert: str | None) -> str:
    """The finished run's adapter file name; a Wan2.2 expert's carries _high / _low, as the published pair."""
    return ADAPTER_FILE if expert is None else f"adapter_{expert}.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file of a run folder cannot be used; the message says which and what to do."""


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders holding both files (non-empty), oldest first."""
    folders = sorted(p for p in (Path(run_dir) / CHECKPOINTS).glob("step-*") if p.is_dir())
    return [p for p in folders
            if all((p / name).is_file() and (p / name).stat().st_size > 0 for name in (ADAPTER_FILE, STATE_FILE))]


def fallback_advice(run_dir: Path, broken: Path | None, remove: list[Path]) -> str:
    """What to remove, and where --resume then continues: the newest complete checkpoint older than `broken`."""
    older = [p for p in complete_checkpoints(run_dir) if broken is None or p.name < broken.name]
    removal = " and ".join(str(p) for p in remove)
    if older:
        return f"remove {removal} and --resume continues from {older[-1].name}, the newest complete checkpoint left"
    return (f"no older complete checkpoint is left: remove {Path(run_dir) / CHECKPOINTS} to start the run afresh "
            "(or choose another output folder)")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None. CheckpointError if latest.json is damaged."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.exists():
        complete = complete_checkpoints(run_dir)
        return complete[-1] if complete else None
    try:
        record = json.loads(pointer.read_text(encoding="utf-8"))
        folder = record["folder"]
        if not isinstance(folder, str) or not folder.startswith("step-") or "/" in folder or "\\" in folder:
            raise ValueError(f"'folder' is {folder!r}, not a step-NNNNNNN name")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        reason = f"no {error} key" if isinstance(error, KeyError) else str(error).splitlines()[0] if str(error) \
            else type(error).__name__
        raise CheckpointError(f"{pointer} is damaged ({reason}): "
                              + fallback_advice(run_dir, None, [pointer])) from None
    folder = Path(run_dir) / CHECKPOINTS / folder
    missing = [name for name in (ADAPTER_FILE, STATE_FILE) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{pointer} names {folder.name}, which lacks {' and '.join(missing)}: "
                              + fallback_advice(run_dir, folder, [folder, pointer]))
    return folder


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


def damaged(folder: Path, file: str, reason: str) -> CheckpointError:
    """The error for an unusable file of checkpoint `folder` (whose run folder is two levels up)."""
    folder = Path(folder)
    run_dir = folder.parent.parent
    return CheckpointError(f"{folder / file} is damaged ({reason}): "
                           + fallback_advice(run_dir, folder, [folder, run_dir / CHECKPOINTS / LATEST]))


def read_training_state(folder: Path) -> dict:
    """The training state of a checkpoint folder; CheckpointError (one line, with what to do) if it is damaged."""
    path = Path(folder) / STATE_FILE
    try:
        # Only tensors and plain containers are stored: the safe unpickler suffices.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, garbage, a pickle of other objects: torch raises many kinds
        lines = str(error).strip().splitlines()
        raise damaged(folder, STATE_FILE, f"unreadable: {lines[0] if lines else type(error).__name__}") from None
    if not isinstance(state, dict):
        raise damaged(folder, STATE_FILE, f"holds a {type(state).__name__}, not a training state")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise damaged(folder, STATE_FILE, f"no {', '.join(missing)}")
    if not isinstance(state["step"], int) or state["step"] < 1 or not isinstance(state["config"], dict):
        raise damaged(folder, STATE_FILE, f"step {state['step']!r} / config of type {type(state['config']).__name__}")
    return state


# ---------------------------------------------------------------------------------------------------------------
# One run per folder.

LOCK_FILE = "train.lock"
UNREADABLE_LOCK_GRACE_S = 10.0  # a lock file with no pid yet is its writer's, unless it is older than this


class RunFolderInUse(OSError):
    """Another live `standin train` holds the run folder's lock."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """RUN_DIR/train.lock, created with O_EXCL and holding {"pid", "host", "started"}; removed by release().

    A lock whose process is gone (same host, pid not running: a killed run) is taken over, and `took_over` says
    whose it was. A lock of another host cannot be checked and is respected; so is a live pid that was reused by
    an unrelated process after a kill (the message names the file to remove then)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.pid, self.host = os.getpid(), socket.gethostname()
        self.took_over: dict | None = None
        self.held = False

    def _create(self) -> bool:
        try:
            handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(handle, "w") as file:
            json.dump({"pid": self.pid, "host": self.host, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, file)
        self.held = True
        return True

    def _holder(self) -> dict | None:
        """The current lock's record; None if there is no lock any more."""
        try:
            text = self.path.read_text(encoding="utf-8")
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
            pid = record.get("pid")
            if not isinstance(pid, int) or isinstance(pid, bool) or pid < 1:
                raise ValueError
            return record
        except (ValueError, AttributeError):
            return {"pid": None, "host": None, "unreadable": True, "age": age}

    def acquire(self) -> "RunLock":
        for _ in range(5):  # a lock removed or taken over between our looks: look again
            if self._create():
                return self
            holder = self._holder()
            if holder is None:
                continue
            if holder.get("unreadable"):
                if holder["age"] < UNREADABLE_LOCK_GRACE_S:  # being written right now
                    raise RunFolderInUse(f"run folder {self.path.parent} is in use by another process (its lock "
                                         f"{self.path} is being written)")
                stale = True
            elif holder.get("host") == self.host:
                stale = not _process_alive(holder["pid"])
            else:
                stale = False
            if not stale:
                where = "" if holder.get("host") == self.host else f" on host {holder.get('host')}"
                raise RunFolderInUse(
                    f"run folder {self.path.parent} is in use by process {holder['pid']}{where} (since "
                    f"{holder.get('started', '?')}): wait for it to finish or choose another output folder; if no "
                    f"such run is going on, remove {self.path}")
            now = self._holder()
            if now is not None and {**now, "age": 0} == {**holder, "age": 0}:  # still the stale one we judged
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                self.took_over = holder
        raise RunFolderInUse(f"run folder {self.path.parent}: could not take its lock {self.path} (other processes "
                             "keep taking it)")

    def release(self) -> None:
        if not self.held or os.getpid() != self.pid:  # a forked child (data loader worker) never removes it
            return
        self.held = False
        holder = self._holder()
        if holder is not None and holder.get("pid") == self.pid and holder.get("host") == self.host:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
