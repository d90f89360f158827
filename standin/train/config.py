"""Settings of `standin prepare-data` and `standin train` (light to import: the CLI reads their defaults)."""

import dataclasses
from dataclasses import dataclass


@dataclass
class PrepareSettings:
    height: int = 480
    width: int = 832
    num_frames: int = 81
    fps: float = 25.0
    max_clips: int = 1  # per source video
    reference_size: int = 512
    reference_frames: int = 5
    default_caption: str | None = None
    face_backend: str | None = None  # standin.faces.get_backend name or path; None: the offline dlib default
    background: str = "grabcut"  # standin.preprocess background removal ("grabcut", "keep" or a parsing model)
    seed: int = 0


@dataclass
class TrainConfig:
    base: str  # Wan diffusers folder, original Wan folder or hub id (see standin.loading)
    data: str  # a `standin prepare-data` folder, or "mini" (the synthetic mini world, on the fly)
    output: str  # the run folder
    steps: int = 3000
    batch_size: int = 1  # per process and micro-step
    grad_accum: int = 1
    rank: int = 128
    # the method is ("restricted", "shifted"); the paper's ablations: vanilla attention, shared positions
    attention: str = "restricted"
    positions: str = "shifted"
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "constant_with_warmup"  # any name diffusers.optimization.get_scheduler knows
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    timestep_sampling: str = "uniform"  # or "logit_normal"
    shift: float | None = None  # None: the base's sampler shift (5 for Wan, standin.loading.sampler_shift)
    seed: int = 0
    # Wan2.2 (two experts): which one this run trains, "high" (`transformer`, timesteps >= the base's boundary)
    # or "low" (`transformer_2`, below it); None for one-transformer bases
    expert: str | None = None
    gradient_checkpointing: bool = False
    fsdp: bool = False
    mixed_precision: str | None = None  # "bf16" or "no"; default: bf16 on GPU, no (float32) on CPU
    num_workers: int = 2
    # mini-world data (and the size of validation videos for any data): clip frames, height, width
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    mini_length: int = 10_000  # items per epoch of the mini world
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    validate_every: int = 0  # 0: validate only at the end; validation off with val_count 0
    val_data: str | None = None  # default: the held-out mini identities for mini data, else the training data
    val_count: int = 2
    val_steps: int = 20
    val_guidance: float = 5.0
    face_backend: str = "auto"  # FaceSim backend: auto, none, mini, dlib, or a standin.faces path
    resume: bool = False
    progress: bool = True

    # What a resumed run may change: bookkeeping, and how the global batch is split over processes and
    # micro-steps (each step reads the same stream positions whatever the split; data.py).
    RESUMABLE_CHANGES = ("output", "num_workers", "checkpoint_every", "keep_checkpoints", "validate_every",
                         "val_data", "val_count", "val_steps", "val_guidance", "face_backend", "resume", "progress",
                         "batch_size", "grad_accum", "fsdp")

    def defining(self, global_batch: int) -> dict:
        """What must match for a resumed run to continue this one exactly (process layout may change)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RESUMABLE_CHANGES}
        if self.lr_scheduler in ("constant", "constant_with_warmup"):
            del fields["steps"]  # no step depends on the run's length: a finished run can be extended
        return {**fields, "global_batch": global_batch}
