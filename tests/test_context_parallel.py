"""Context parallelism (diffusers' `enable_parallelism`: the video tokens sharded over processes) with a reference is
exact: 2 processes == 1 process, for the velocity of one forward (recording and cached) and for whole sampled videos
(cached, uncached, two references, no reference), for Ulysses, ring and both at once (unified, 4 processes).

Each rank appends its own slice of the reference keys/values (standin.models.reference.concat_reference); the
`_naive` runs append the whole reference on every rank, as a processor unaware of the sharding would, and
must be clearly wrong: that is what makes this test able to fail. Tolerance 1e-5: the two runs differ only in the
order of float32 sums (measured 1e-7 to 5e-7). Ring attention uses the same per-rank slices (each rank's keys go
round the ring once) and merges partial attentions by their log-sum-exp, which no CPU attention backend returns:
the worker puts a plain softmax that returns it in place of diffusers' native forward op (the GPU backends that
ring uses, flash and cuDNN, return it themselves).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, relative_error

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("context_parallel_worker.py")


def run_worker(tmp_path, kind: str, processes: int = 2) -> dict:
    output = tmp_path / f"{kind}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    if kind == "none":
        command = [sys.executable, str(WORKER), str(output), kind]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), str(WORKER),
                   str(output), kind]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(output)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("cp"), "none")


@pytest.mark.parametrize("kind, processes", [("ulysses", 2), ("ring", 2), ("unified", 4)])
def test_context_parallel_with_a_reference_is_exact(one_process, tmp_path, kind, processes):
    sharded = run_worker(tmp_path, kind, processes)
    assert one_process.keys() == sharded.keys()
    for name in one_process:
        assert relative_error(sharded[name], one_process[name]) <= 1e-5, name


@pytest.mark.parametrize("kind", ["ulysses", "ring"])
def test_the_reference_appended_on_every_rank_would_be_wrong(one_process, tmp_path, kind):
    naive = run_worker(tmp_path, f"{kind}_naive")
    assert relative_error(naive["base"], one_process["base"]) <= 1e-5  # no reference: unaffected
    assert relative_error(naive["cached"], one_process["cached"]) > 1e-3


def test_generate_parallel_under_torchrun_writes_the_one_process_video(tmp_path):
    import numpy as np
    import PIL.Image

    from standin.checkpoint import save_adapter
    from standin.tiny import tiny_pipeline
    from standin.video import read_video

    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "base")
    save_adapter(pipe.adapters["transformer"], tmp_path / "adapter.safetensors")
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    arguments = ["generate", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter.safetensors"),
                 "--reference", str(tmp_path / "a.png"), "--prompt", "a person nods", "--height", "32", "--width",
                 "48", "--frames", "5", "--steps", "2", "--no-preprocess", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    one = subprocess.run([sys.executable, "-m", "standin.cli", *arguments, "-o", str(tmp_path / "one.mp4")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "standin.cli",
                          *arguments, "--parallel", "ulysses", "-o", str(tmp_path / "two.mp4")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count('"video"') == 1  # one report, from rank 0
    difference = np.abs(read_video(tmp_path / "one.mp4").astype(int) - read_video(tmp_path / "two.mp4").astype(int))
    assert difference.max() <= 1  # float32 sums in another order may move a pixel by one level
