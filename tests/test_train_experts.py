"""`standin train --expert high|low` on a tiny two-expert (Wan2.2-like) base: each run trains its expert alone, on
its own timesteps (>= 875 for high, < 875 for low, as the pipeline switches), resumes exactly, and the two
adapter files load as the pair the pipeline generates with."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import encode_square_videos, interrupt_training, losses, reference_image, train_config
from diffusers import WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file

from standin.cli import main
from standin.loading import load_pipeline
from standin.tiny import tiny_pipeline
from standin.train.trainer import VALIDATION_LEVELS, ExpertRange, Trainer, shifted_sigma

pytestmark = pytest.mark.usefixtures("one_thread")

BOUNDARY = 875.0  # Wan2.2-A14B's boundary_ratio 0.875 x 1000 timesteps, as the tiny base has it
SUBFOLDER = {"high": "transformer", "low": "transformer_2"}


@pytest.fixture(scope="module")
def two_expert_base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "tiny22"
    tiny_pipeline(with_adapter=False, two_experts=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoded_data(two_expert_base, tmp_path_factory) -> Path:
    """The conftest videos, pre-encoded with the two-expert base (which loads one expert to do it)."""
    return encode_square_videos(tmp_path_factory.mktemp("data"), two_expert_base)


def expert_config(base, data, output, expert, **overrides):
    return train_config(base, data, output, expert=expert, **{"steps": 3, **overrides})


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


def record_timesteps(trainer: Trainer) -> list[float]:
    seen = []
    trainer.model.transformer.register_forward_pre_hook(lambda module, args: seen.extend(args[1].tolist()))
    return seen


# ---- the noise levels ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_each_expert_gets_the_samplers_levels_conditioned_on_its_range(sampling):
    high, low = (ExpertRange(expert, BOUNDARY, 5.0, sampling) for expert in ("high", "low"))
    grid = torch.linspace(0, 1, 100_001)[:-1]
    # exactly the pipeline's test on the timestep the model gets (t >= boundary: the high-noise expert)
    assert (high.sigma(grid) * 1000 >= BOUNDARY).all() and (low.sigma(grid) * 1000 < BOUNDARY).all()
    assert high.sigma_bounds[0] * 1000 == BOUNDARY  # timestep 875 itself is the high expert's

    # the distribution: the unrestricted sampler's levels that fall in the range, in the same proportions
    generator = torch.Generator().manual_seed(0)

    def draws(n):
        return torch.rand(n, generator=generator) if sampling == "uniform" else torch.sigmoid(
            torch.randn(n, generator=generator))

    plain = shifted_sigma(draws(200_000), 5.0)
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    for expert, mask in ((high, plain * 1000 >= BOUNDARY), (low, plain * 1000 < BOUNDARY)):
        restricted = expert.sigma(draws(50_000))
        expected = torch.quantile(plain[mask][:50_000], quantiles)
        assert torch.allclose(torch.quantile(restricted, quantiles), expected, atol=0.01)


# ---- refusals --------------------------------------------------------------------------------------------------


def test_expert_is_required_on_two_experts_and_refused_on_one(two_expert_base, tiny_base, encoded_data, tmp_path,
                                                               capsys):
    run = tmp_path / "run"
    args = ["train", "--base", str(two_expert_base), "--data", str(encoded_data), "-o", str(run), "--val-count", "0",
            "--num-workers", "0", "--no-progress"]
    assert main(args) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: this base has two experts (Wan2.2)") and "--expert high" in error
    with pytest.raises(ValueError, match="--expert high: this base has one transformer"):
        Trainer(expert_config(tiny_base, encoded_data, run, "high"))
    assert not run.exists()  # refused before the run folder is made


# ---- training, and the pair ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def expert_runs(two_expert_base, encoded_data, tmp_path_factory) -> dict:
    """A 3-step run of each expert, with the timesteps its transformer saw; the low run also validates."""
    root, before = tmp_path_factory.mktemp("experts"), folder_digest(two_expert_base)
    runs = {}
    for expert, val_count in (("high", 0), ("low", 1)):
        trainer = Trainer(expert_config(two_expert_base, encoded_data, root / expert, expert, val_count=val_count))
        timesteps = record_timesteps(trainer)
        report = trainer.train()
        runs[expert] = dict(trainer=trainer, timesteps=timesteps, report=report, run=root / expert)
    runs["base_unchanged"] = folder_digest(two_expert_base) == before
    return runs


@pytest.mark.parametrize("expert", ["high", "low"])
def test_an_expert_run_trains_its_expert_alone_on_its_timesteps(expert_runs, two_expert_base, expert):
    trainer, timesteps, run = (expert_runs[expert][key] for key in ("trainer", "timesteps", "run"))
    # batch 2 per step, 3 steps (and the low run's validation: 4 levels, with and without the reference); all on
    # the expert's side of the boundary
    assert len(timesteps) == (6 if expert == "high" else 6 + 2 * VALIDATION_LEVELS)
    assert all(t >= BOUNDARY for t in timesteps) if expert == "high" else all(t < BOUNDARY for t in timesteps)

    # the trained transformer is that expert, bit for bit as on disk; the other is not in memory
    assert trainer.pipe.transformer_2 is None
    trained = trainer.model.transformer.state_dict()
    for name, subfolder in SUBFOLDER.items():
        on_disk = WanTransformer3DModel.from_pretrained(two_expert_base / subfolder).state_dict()
        assert all(torch.equal(trained[key], on_disk[key]) for key in on_disk) == (name == expert)
    assert expert_runs["base_unchanged"]

    # its own adapter file, which says which expert it is for
    path = run / f"adapter_{expert}.safetensors"
    assert expert_runs[expert]["report"]["adapter"] == str(path) and not (run / "adapter.safetensors").exists()
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["expert"] == expert and float(metadata["boundary"]) == BOUNDARY


def test_an_expert_run_validates_its_loss_with_and_without_the_reference(expert_runs):
    validation = expert_runs["low"]["report"]["validation"]
    assert len(validation) == 1 and set(validation[0]) == {"case", "prompt", "loss", "loss_without_reference"}
    assert all(validation[0][key] > 0 for key in ("loss", "loss_without_reference"))
    saved = json.loads((expert_runs["low"]["run"] / "validation/step-0000003/results.json").read_text())
    assert saved == validation


def test_the_two_trained_files_load_as_a_pair_and_generate(expert_runs, two_expert_base):
    high = expert_runs["high"]["run"] / "adapter_high.safetensors"
    low = expert_runs["low"]["run"] / "adapter_low.safetensors"
    pipe = load_pipeline(two_expert_base, high, low, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for expert, path in (("transformer", high), ("transformer_2", low)):
        loaded, trained = pipe.adapters[expert].state_dict(), load_file(str(path))
        assert all(torch.equal(loaded[key], trained[key]) for key in trained)
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:
        getattr(pipe, name).register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    video = pipe(prompt="a square moves down", reference_image=reference_image(), preprocess_reference=False,
                 height=32, width=32, num_frames=5, num_inference_steps=3, output_type="np").frames
    assert video.shape == (1, 5, 32, 32, 3) and bool(torch.isfinite(torch.from_numpy(video)).all())
    assert calls["transformer"] and calls["transformer_2"]  # timesteps 1000, 909 (high) and 714 (low)
    with pytest.raises(ValueError, match="low-noise expert's adapter, given as the high-noise one"):
        load_pipeline(two_expert_base, low, high, device="cpu", dtype=torch.float32)


# ---- exact resume ----------------------------------------------------------------------------------------------

RESUME = dict(steps=5, batch_size=1, grad_accum=2, checkpoint_every=2, keep_checkpoints=3)


def test_an_interrupted_expert_run_resumes_exactly_and_only_as_that_expert(two_expert_base, encoded_data, tmp_path,
                                                                           monkeypatch):
    reference = tmp_path / "uninterrupted"
    Trainer(expert_config(two_expert_base, encoded_data, reference, "low", **RESUME)).train()

    run = tmp_path / "run"
    train_step = interrupt_training(monkeypatch, 4)  # steps 1-3 done, the last checkpoint is step 2
    with pytest.raises(KeyboardInterrupt):
        Trainer(expert_config(two_expert_base, encoded_data, run, "low", **RESUME)).train()
    monkeypatch.setattr(Trainer, "train_step", train_step)

    with pytest.raises(ValueError, match="--resume with --expert high: .* trains the low-noise expert"):
        Trainer(expert_config(two_expert_base, encoded_data, run, "high", resume=True, **RESUME))
    report = Trainer(expert_config(two_expert_base, encoded_data, run, "low", resume=True, **RESUME)).train()
    assert report["resumed_from_step"] == 2
    adapter, expected = (load_file(str(folder / "adapter_low.safetensors")) for folder in (run, reference))
    assert adapter.keys() == expected.keys() and all(torch.equal(adapter[k], expected[k]) for k in expected)
    assert losses(run) == losses(reference)
