"""Two processes (gloo on CPU, launched by `accelerate launch`) train like one process with the same global batch:
with DDP (the default) and with FSDP2 sharding (--fsdp, here with gradient checkpointing); a sharded run resumed
from a checkpoint ends exactly where the uninterrupted one did.

Tolerance. Both runs read the same samples with the same noise (data.py) and start from the same adapter; they
differ only in the order of float32 sums: the batch mean of the loss (one process) against the all-reduce of two
half-batch means, and the same for the gradients: a relative error of about one float32 ulp (6e-8) per step.
Adam's update does not depend on the gradient's scale, so the error stays relative; over these 8 steps we
measured at most 9.4e-8 in the loss and 2.6e-7 in any adapter weight, for DDP and FSDP alike. 1e-5 leaves
room for other BLAS builds and still catches real divergence: without the gradient all-reduce (each process
stepping on its own half-batch) the loss is off by 7e-5 at step 3 and 3e-3 at step 8 (the learning rate is 0
in step 1 of the warmup, so step 2 cannot differ yet).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, losses, train_config
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from standin.checkpoint import load_adapter
from standin.train import run_state
from standin.train.trainer import Trainer

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]
SETTINGS = dict(steps=8, rank=8, lr=1e-2, warmup_steps=2, checkpoint_every=4)
GLOBAL_BATCH = 2


@pytest.fixture(scope="module")
def one_process(tiny_base, encoded_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("one") / "run"
    torch.set_num_threads(1)
    Trainer(train_config(tiny_base, encoded_data, run, batch_size=GLOBAL_BATCH, **SETTINGS)).train()
    return run


def launch_two_processes(base, data, run, *extra) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = launcher + ["-m", "standin.cli", "train", "--base", str(base), "--data", str(data), "-o", str(run),
                          "--batch-size", str(GLOBAL_BATCH // 2), "--num-workers", "0", "--val-count", "0",
                          "--no-progress", *extra]
    command += [f"--{key.replace('_', '-')}={value}" for key, value in SETTINGS.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


# FSDP with gradient checkpointing is what a multi-GPU 14B run uses (docs/training.md).
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_the_one_process_loss_curve(mode, tiny_base, encoded_data, one_process, tmp_path):
    run = tmp_path / mode
    extra = ["--fsdp", "--gradient-checkpointing"] if mode == "fsdp" else []
    result = launch_two_processes(tiny_base, encoded_data, run, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # printed once, by the main process
    assert report["processes"] == 2 and report["global_batch"] == GLOBAL_BATCH

    two, one = losses(run), losses(one_process)
    assert len(two) == len(one) == SETTINGS["steps"]
    assert max(abs(a - b) / b for a, b in zip(two, one)) < 1e-5

    # the checkpoint is the whole adapter and the whole optimizer state, whatever the sharding: it loads as is
    adapter, expected = load_file(str(run / "adapter.safetensors")), load_file(str(one_process / "adapter.safetensors"))
    assert all(torch.allclose(adapter[k], expected[k], rtol=1e-4, atol=1e-6) for k in expected)
    transformer = WanTransformer3DModel.from_pretrained(tiny_base / "transformer")
    assert load_adapter(run / "adapter.safetensors", transformer).rank == SETTINGS["rank"]
    state = run_state.read_training_state(run / "checkpoints/step-0000008")
    expected_state = run_state.read_training_state(one_process / "checkpoints/step-0000008")
    assert state["optimizer"]["state"].keys() == expected_state["optimizer"]["state"].keys()
    for name, tensors in expected_state["optimizer"]["state"].items():
        assert state["optimizer"]["state"][name]["exp_avg"].shape == tensors["exp_avg"].shape

    if mode == "fsdp":  # the sharded path of a 14B run: killed after the checkpoint of step 4, then resumed
        finished = load_file(str(run / "adapter.safetensors"))
        shutil.rmtree(run / "checkpoints/step-0000008")
        (run / "checkpoints" / run_state.LATEST).write_text(json.dumps({"folder": "step-0000004", "step": 4}))
        result = launch_two_processes(tiny_base, encoded_data, run, *extra, "--resume")
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout)["resumed_from_step"] == 4
        resumed = load_file(str(run / "adapter.safetensors"))
        assert all(torch.equal(resumed[k], finished[k]) for k in finished)
        assert losses(run) == two
