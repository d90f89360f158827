"""What the rest of the mini package and the command line need without importing torch: where the shipped
weights are, the clip format of the world, and the face model's training settings."""

from dataclasses import dataclass
from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
MINI_WEIGHTS = WEIGHTS / "base"  # the frozen base, a diffusers StandInPipeline folder (train_base.py)
MINI_ADAPTER = WEIGHTS / "standin_adapter.safetensors"  # its Stand-In adapter (`standin train`)
IDENTITY_WEIGHTS = WEIGHTS / "identity.safetensors"  # the world's face model (train_identity.py)

# The world's clips, and what the mini model is trained on: 17 frames of 64x64 (latents 16 x 17 x 8 x 8; the VAE
# is frame-wise, so any frame count works); references are 64x64.
MINI_SIZES = dict(height=64, width=64, num_frames=17)
MINI_FPS = 8  # the world's actions span a clip: 17 frames play in two seconds


@dataclass
class IdentityTrainConfig:
    """train_identity.py's settings (there as TrainConfig)."""

    steps: int = 1600
    detector_batch: int = 32  # frames
    embedder_identities: int = 48  # identities per batch, two views each
    lr: float = 2e-3
    weight_decay: float = 5e-4
    temperature: float = 0.1  # of the contrastive loss
    warmup: int = 100
    checkpoint_every: int = 100
    log_every: int = 25
    workers: int = 1  # processes rendering batches ahead of the training step
    seed: int = 0
