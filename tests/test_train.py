"""`standin train` on a tiny Wan saved to disk: it learns, it touches only the adapter, its checkpoints load,
and a run interrupted at any moment (exception, crash inside a checkpoint write, SIGKILL) and resumed ends with
exactly the adapter of the uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, interrupt_training, losses, train_config
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from standin.checkpoint import load_adapter
from standin.cli import main
from standin.train import run_state
from standin.train.data import SampleStream, StepBatches
from standin.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

def assert_same_adapter(run: Path, reference: Path) -> None:
    adapter, expected = load_file(str(run / "adapter.safetensors")), load_file(str(reference / "adapter.safetensors"))
    assert adapter.keys() == expected.keys()
    assert all(torch.equal(adapter[key], expected[key]) for key in expected)


# ---------------------------------------------------------------------------------------------------------------
# The data stream.


def test_every_step_reads_the_same_samples_however_the_batch_is_split():
    def step_positions(batch_size, processes, accumulation, step):
        positions = []
        for rank in range(processes):
            batches = list(StepBatches(batch_size, processes, rank, accumulation, step, step + 1))
            positions += [p for batch in batches for p in batch]
        return sorted(positions)

    for step in (0, 5):
        expected = list(range(4 * step, 4 * step + 4))
        assert step_positions(4, 1, 1, step) == expected
        assert step_positions(1, 2, 2, step) == expected
        assert step_positions(2, 2, 1, step) == expected
        assert step_positions(1, 1, 4, step) == expected


def test_the_stream_visits_every_item_once_per_epoch_in_a_seeded_order():
    stream = SampleStream(list(range(5)), seed=3)
    epochs = [[stream.index(5 * e + i) for i in range(5)] for e in range(3)]
    assert all(sorted(epoch) == list(range(5)) for epoch in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # reshuffled
    assert epochs == [[SampleStream(list(range(5)), seed=3).index(5 * e + i) for i in range(5)] for e in range(3)]


# ---------------------------------------------------------------------------------------------------------------
# Learning, and nothing but the adapter.


def test_overfit_run_lowers_the_loss_and_changes_only_the_adapter(tiny_base, encoded_data, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(train_config(tiny_base, encoded_data, run, steps=60, batch_size=3, checkpoint_every=30))
    # the same 30 samples (data, noise, noise level) before and after
    probe = torch.utils.data.default_collate([trainer.loader.dataset[p] for p in range(10_000, 10_030)])
    with torch.no_grad():
        probe_before = trainer.loss(probe).item()
    adapter_before = {k: v.clone() for k, v in trainer.model.adapter.state_dict().items()}
    report = trainer.train()
    with torch.no_grad():
        probe_after = trainer.loss(probe).item()

    assert probe_after < 0.9 * probe_before
    curve = losses(run)
    assert len(curve) == 60 and np.mean(curve[-15:]) < 0.9 * np.mean(curve[:15])
    assert report["steps"] == 60 and report["loss_first"] == curve[0] and report["pre_encoded"]

    # the base is bit for bit the one on disk
    on_disk = WanTransformer3DModel.from_pretrained(tiny_base / "transformer").state_dict()
    trained = trainer.model.transformer.state_dict()
    assert trained.keys() == on_disk.keys()
    assert all(torch.equal(trained[key], on_disk[key]) for key in on_disk)
    # every adapter tensor moved except the last block's q LoRA, which can get no gradient
    adapter_after = trainer.model.adapter.state_dict()
    frozen = {k for k in adapter_after if k.startswith("blocks.1.self_attn.q_loras")}
    assert all(torch.equal(adapter_after[k], adapter_before[k]) == (k in frozen) for k in adapter_after)

    # the final adapter and the checkpoints load with the inference loader
    for path in (run / "adapter.safetensors", run / "checkpoints/step-0000030/adapter.safetensors"):
        adapter = load_adapter(path, trainer.model.transformer)
        assert adapter.rank == 8
    final = load_adapter(run / "adapter.safetensors", trainer.model.transformer).state_dict()
    assert all(torch.equal(final[k], adapter_after[k]) for k in adapter_after)
    assert json.loads((run / "report.json").read_text())["steps"] == 60
    assert "step 60 loss" in (run / "train.log").read_text()


def test_gradient_checkpointing_changes_nothing_but_memory(tiny_base, encoded_data, tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    Trainer(train_config(tiny_base, encoded_data, plain)).train()
    Trainer(train_config(tiny_base, encoded_data, checkpointed, gradient_checkpointing=True)).train()
    assert losses(checkpointed) == losses(plain)
    assert_same_adapter(checkpointed, plain)


@pytest.mark.parametrize("variant", [dict(attention="vanilla"), dict(positions="shared")])
def test_ablation_variants_train_and_are_recorded_in_the_adapter(tiny_base, encoded_data, tmp_path, variant):
    run = tmp_path / "ablation"
    Trainer(train_config(tiny_base, encoded_data, run, steps=2, **variant)).train()
    adapter = load_adapter(run / "adapter.safetensors", WanTransformer3DModel.from_pretrained(tiny_base / "transformer"))
    assert {key: getattr(adapter, key) for key in variant} == variant
    assert len(losses(run)) == 2


# ---------------------------------------------------------------------------------------------------------------
# Interrupted + resumed == uninterrupted, exactly.

RESUME_SETTINGS = dict(steps=7, batch_size=1, grad_accum=2, checkpoint_every=3, keep_checkpoints=3)


@pytest.fixture(scope="module")
def uninterrupted(tiny_base, encoded_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    Trainer(train_config(tiny_base, encoded_data, run, **RESUME_SETTINGS)).train()
    return run


def assert_same_run(run: Path, reference: Path) -> None:
    assert_same_adapter(run, reference)
    assert losses(run) == losses(reference)
    state = run_state.read_training_state(run / "checkpoints/step-0000007")["optimizer"]["state"]
    expected_state = run_state.read_training_state(reference / "checkpoints/step-0000007")["optimizer"]["state"]
    moments = ("exp_avg", "exp_avg_sq")
    assert all(torch.equal(state[name][k], expected_state[name][k]) for name in expected_state for k in moments)


def test_interrupted_then_resumed_run_equals_the_uninterrupted_one(tiny_base, encoded_data, uninterrupted,
                                                                   tmp_path, monkeypatch):
    run = tmp_path / "run"
    train_step = interrupt_training(monkeypatch, 5)  # steps 1-4 done, the last checkpoint is step 3
    with pytest.raises(KeyboardInterrupt):
        Trainer(train_config(tiny_base, encoded_data, run, **RESUME_SETTINGS)).train()
    assert run_state.latest_checkpoint(run).name == "step-0000003"
    assert len(losses(run)) == 4
    monkeypatch.setattr(Trainer, "train_step", train_step)

    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(train_config(tiny_base, encoded_data, run, **RESUME_SETTINGS))
    report = Trainer(train_config(tiny_base, encoded_data, run, resume=True, **RESUME_SETTINGS)).train()
    assert report["resumed_from_step"] == 3
    assert_same_run(run, uninterrupted)


def test_crash_inside_a_checkpoint_write_leaves_the_previous_checkpoint(tiny_base, encoded_data, uninterrupted,
                                                                       tmp_path, monkeypatch):
    run = tmp_path / "run"
    atomic_write = run_state.atomic_write

    def failing_write(path, write):
        if Path(path).parent.name == "step-0000006" and Path(path).name == run_state.STATE_FILE:
            raise OSError("disk gone")  # the adapter file of step 6 is written, its training state is not
        return atomic_write(path, write)

    monkeypatch.setattr(run_state, "atomic_write", failing_write)
    with pytest.raises(OSError, match="disk gone"):
        Trainer(train_config(tiny_base, encoded_data, run, **RESUME_SETTINGS)).train()
    monkeypatch.setattr(run_state, "atomic_write", atomic_write)
    assert run_state.latest_checkpoint(run).name == "step-0000003"
    assert not list((run / "checkpoints/step-0000006").glob(".*"))  # no temporary file left behind

    Trainer(train_config(tiny_base, encoded_data, run, resume=True, **RESUME_SETTINGS)).train()
    assert_same_run(run, uninterrupted)


def test_resume_refuses_settings_that_change_the_run(tiny_base, encoded_data, uninterrupted):
    with pytest.raises(ValueError, match="lr: 0.01 -> 0.02"):
        Trainer(train_config(tiny_base, encoded_data, uninterrupted, resume=True, **{**RESUME_SETTINGS, "lr": 2e-2}))


def test_a_finished_run_extended_with_more_steps_equals_the_longer_run(tiny_base, encoded_data, uninterrupted,
                                                                      tmp_path):
    run = tmp_path / "run"
    Trainer(train_config(tiny_base, encoded_data, run, **{**RESUME_SETTINGS, "steps": 4})).train()
    Trainer(train_config(tiny_base, encoded_data, run, resume=True, **RESUME_SETTINGS)).train()
    assert_same_run(run, uninterrupted)
    # A schedule that depends on the run's length cannot be extended.
    linear = dict(steps=2, lr_scheduler="linear")
    Trainer(train_config(tiny_base, encoded_data, tmp_path / "linear", **linear)).train()
    with pytest.raises(ValueError, match="steps: 2 -> 3"):
        Trainer(train_config(tiny_base, encoded_data, tmp_path / "linear", resume=True, **{**linear, "steps": 3}))


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_is_exact(tiny_base, encoded_data, tmp_path):
    """The real thing: `standin train` killed with SIGKILL somewhere after its first checkpoint."""
    settings = dict(steps=150, batch_size=2, checkpoint_every=10, rank=8, lr=1e-2, warmup_steps=2)
    reference = tmp_path / "reference"
    Trainer(train_config(tiny_base, encoded_data, reference, **settings)).train()

    run = tmp_path / "killed"
    command = [sys.executable, "-m", "standin.cli", "train", "--base", str(tiny_base), "--data", str(encoded_data),
               "-o", str(run), "--num-workers", "0", "--val-count", "0", "--no-progress"]
    command += [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while run_state.latest_checkpoint(run) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(random.uniform(0.0, 1.0))
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    killed_at = run_state.latest_checkpoint(run)
    assert killed_at is not None and killed_at.name != "step-0000150"

    Trainer(train_config(tiny_base, encoded_data, run, resume=True, **settings)).train()
    assert_same_adapter(run, reference)
    assert losses(run) == losses(reference)


# ---------------------------------------------------------------------------------------------------------------
# The command line, on the mini world generated on the fly.


def test_cli_trains_on_the_mini_world_and_writes_validation_videos(tiny_base, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--base", str(tiny_base), "--data", "mini", "-o", str(run), "--steps", "2",
                 "--batch-size", "2", "--rank", "4", "--frames", "5", "--height", "32", "--width", "32",
                 "--num-workers", "1", "--val-count", "1", "--val-steps", "2", "--validate-every", "1",
                 "--face-backend", "none", "--no-progress"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 2 and not report["pre_encoded"] and report["global_batch"] == 2
    for step in ("step-0000001", "step-0000002"):
        folder = run / "validation" / step
        assert sorted(p.name for p in folder.iterdir()) == [
            "case-00.mp4", "case-00.reference.png", "case-00.sheet.png", "results.json"]
    assert report["validation"][0]["video"].endswith("step-0000002/case-00.mp4")
    transformer = WanTransformer3DModel.from_pretrained(tiny_base / "transformer")
    assert load_adapter(run / "adapter.safetensors", transformer).rank == 4
