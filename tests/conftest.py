import json
import sys
from pathlib import Path

import imageio
import numpy as np
import PIL.Image
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import standin  # noqa: E402
from standin.faces.base import Face  # noqa: E402
from standin.models import StandInModel  # noqa: E402
from standin.tiny import tiny_pipeline, tiny_transformer  # noqa: E402
from standin.train.config import PrepareSettings, TrainConfig  # noqa: E402
from standin.train.prepare import prepare_dataset  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is several times faster than two fighting over a busy CPU. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize_lora_up(adapter, std=0.1, seed=0):
    """A trained adapter has B != 0; tests use random B so the LoRA path is exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if name.endswith("up.weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return adapter


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def standin_model():
    torch.manual_seed(0)
    model = StandInModel(tiny_transformer(), rank=4)
    randomize_lora_up(model.adapter)
    return model


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(2, 16, 3, 8, 10, generator=generator),
        timestep=torch.tensor([700.0, 250.0]),
        encoder_hidden_states=torch.randn(2, 7, 32, generator=generator),
        reference_latents=torch.randn(1, 16, 1, 8, 8, generator=generator),
    )


# ---- pipelines ------------------------------------------------------------------------------------------------
SIZES = dict(height=32, width=32, num_frames=5)


def reference_image(seed=0, size=(40, 30)):
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def noise(seed=0):
    return torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(seed))


def run(pipe, reference=None, seed=0, **kwargs):
    """A short tiny-pipeline generation from fixed noise; returns the final latents."""
    kwargs = {"output_type": "latent", "num_inference_steps": 3, "prompt": "a man waves in the snow", **kwargs}
    return pipe(**SIZES, latents=noise(seed), reference_image=reference, preprocess_reference=False, **kwargs).frames


# ---- training -------------------------------------------------------------------------------------------------
REPO = Path(standin.__file__).parents[1]


class CentreFace:
    """A face backend that finds one face in the middle of any frame: training tests need no face detector."""

    name = "centre"

    def detect(self, image):
        height, width = image.shape[:2]
        return [Face(box=(0.3 * width, 0.2 * height, 0.7 * width, 0.7 * height))]

    def embed(self, image, face):
        return np.full(4, 0.5, np.float32)


def write_square_videos(folder: Path, count: int = 3, frames: int = 30) -> None:
    """Small captioned videos: a coloured square moving down over moving stripes, different per video."""
    folder.mkdir(parents=True, exist_ok=True)
    _, xx = np.mgrid[:48, :64]
    for v in range(count):
        video = []
        for t in range(frames):
            image = np.repeat((np.sin(xx / 7 + t / 4 + v) * 60 + 120)[..., None], 3, axis=2).astype(np.uint8)
            image[10 + t // 3 : 30 + t // 3, 20 + 5 * v : 40 + 5 * v] = (30 + 40 * v, 200 - 50 * v, 80 + 60 * v)
            video.append(image)
        imageio.mimwrite(folder / f"square{v}.mp4", video, fps=25, macro_block_size=1)
        (folder / f"square{v}.txt").write_text(f"a square number {v} moves down")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "tiny"
    tiny_pipeline(with_adapter=False).save_pretrained(folder)
    return folder


def encode_square_videos(root: Path, base: Path) -> Path:
    """The three square clips, pre-encoded with `base` (latents, text embeddings, reference latents) in root."""
    write_square_videos(root / "videos")
    settings = PrepareSettings(height=32, width=32, num_frames=9, fps=12.5, reference_size=32, background="keep")
    prepare_dataset(root / "videos", root / "dataset", settings, encode_with=str(base), device="cpu",
                    backend=CentreFace(), progress=False)
    return root / "dataset"


@pytest.fixture(scope="module")
def encoded_data(tmp_path_factory, tiny_base) -> Path:
    """A pre-encoded dataset of the tiny base, three clips."""
    return encode_square_videos(tmp_path_factory.mktemp("data"), tiny_base)


def interrupt_training(monkeypatch, at_call: int):
    """Trainer.train_step raises KeyboardInterrupt at its `at_call`-th call (the steps before it complete);
    returns the real train_step, to put back."""
    from standin.train.trainer import Trainer

    train_step, calls = Trainer.train_step, []

    def interrupted_step(self, batches):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return train_step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    return train_step


def train_config(base, data, output, **overrides) -> TrainConfig:
    settings = dict(steps=6, batch_size=2, rank=8, lr=1e-2, warmup_steps=2, num_workers=0, val_count=0,
                    checkpoint_every=2, progress=False)
    return TrainConfig(base=str(base), data=str(data), output=str(output), **{**settings, **overrides})


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


