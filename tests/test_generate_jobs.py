"""`standin generate --jobs FILE` on the embedded mini model: 2 processes under `accelerate launch` write exactly the
1-process videos, a killed run resumes without redoing finished videos, a failed video is reported while the
others finish, and a malformed jobs file is refused line by line before anything is loaded or written.

The videos are compared as decoded frames, bit for bit; the files themselves differ (their metadata records the
time they were written).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from standin.cli import main
from standin.video import read_video

GOOD = "abcd"  # the outputs out/a.mp4 ... out/d.mp4; out/e.mp4 fails (its reference is missing)
SHARED = ["--steps", "2", "--frames", "9"]  # the defaults of every job, kept small for speed
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
LAUNCH_TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def write_jobs(folder: Path) -> Path:
    """Five jobs: relative and absolute references, one and two references and none, overrides of the defaults,
    and a missing reference."""
    (folder / "refs").mkdir(parents=True)
    shutil.copy(REPO / "examples/woman_34.png", folder / "refs/woman.png")
    man = str(REPO / "examples/man_2.png")
    jobs = [{"prompt": "A woman waves on a beach at noon.", "reference": "refs/woman.png", "seed": 1, "output": "out/a.mp4"},
            {"prompt": "A man jumps in a forest at night.", "reference": man, "seed": 2, "output": "out/b.mp4",
             "frames": 5, "fps": 4},
            {"prompt": "A child runs in a city at noon.", "output": "out/c.mp4"},
            {"prompt": "A woman and a man wave on a beach at noon.", "reference": ["refs/woman.png", man],
             "output": "out/d.mp4", "steps": 3, "guidance": 4},
            {"prompt": "A woman waves on a beach at noon.", "reference": "refs/missing.png", "output": "out/e.mp4"}]
    path = folder / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(job) for job in jobs[:2]) + "\n\n" +  # a blank line is no job
                    "\n".join(json.dumps(job) for job in jobs[2:]) + "\n")
    return path


def generate_jobs(jobs: Path, launcher=(), **popen):
    """The CLI in a subprocess, run from another folder (relative paths are the jobs file's, not the cwd's)."""
    command = [*launcher, *([] if launcher else [sys.executable]), "-m", "standin.cli", "generate", "--jobs",
               str(jobs), *SHARED]
    return subprocess.Popen(command, cwd=jobs.parents[1], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def finish(process) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def summary(jobs: Path) -> dict:
    return json.loads(jobs.with_suffix(".summary.json").read_text())


def statuses(jobs: Path) -> dict[str, str]:
    return {Path(r["output"]).stem: r["status"] for r in summary(jobs)["results"]}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    jobs = write_jobs(tmp_path_factory.mktemp("one") / "batch")
    return jobs, finish(generate_jobs(jobs))


@pytest.mark.slow
def test_a_failed_video_is_reported_and_the_others_are_made(one_process):
    from standin.provenance import read_metadata

    jobs, result = one_process
    assert result.returncode == 1, result.stderr[-3000:]
    assert statuses(jobs) == {"a": "done", "b": "done", "c": "done", "d": "done", "e": "failed"}
    failed = summary(jobs)["results"][-1]
    assert failed["line"] == 6 and failed["reason"] == f"{jobs.parent}/refs/missing.png: no such reference image"
    assert summary(jobs)["done"] == 4 and summary(jobs)["failed"] == 1
    assert "failed: line 6" in result.stdout and "no such reference image" in result.stdout
    out = jobs.parent / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "a.mp4", "a.reference.png", "a.sheet.png", "b.mp4", "b.reference.png", "b.sheet.png", "c.mp4", "c.sheet.png",
        "d.mp4", "d.reference-1.png", "d.reference-2.png", "d.sheet.png"]
    # the shared flags are the defaults, a line overrides them; every video carries its provenance
    assert [len(read_video(out / f"{name}.mp4")) for name in GOOD] == [9, 5, 9, 9]
    tags = {name: read_metadata(out / f"{name}.mp4") for name in GOOD}
    assert [tags[name]["seed"] for name in GOOD] == ["1", "2", "0", "0"]
    assert [tags[name]["steps"] for name in GOOD] == ["2", "2", "2", "3"]
    assert tags["b"]["prompt"] == "A man jumps in a forest at night." and tags["a"]["ai_generated"] == "true"


@pytest.mark.slow
def test_two_processes_write_the_one_process_videos_bit_for_bit(one_process, tmp_path):
    one, _ = one_process
    two = write_jobs(tmp_path / "batch")
    result = finish(generate_jobs(two, LAUNCH_TWO))
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stdout.count("5 videos, 2 processes") == 1  # one summary, from rank 0, covering both
    assert statuses(two) == statuses(one)
    # video i (blank lines not counted) went to process i % 2
    assert [r["process"] for r in summary(two)["results"]] == [0, 1, 0, 1, 0]
    for name in GOOD:
        assert np.array_equal(read_video(two.parent / f"out/{name}.mp4"), read_video(one.parent / f"out/{name}.mp4"))
    for image in ("a.reference.png", "a.sheet.png", "b.sheet.png", "d.reference-2.png", "d.sheet.png"):
        assert (two.parent / "out" / image).read_bytes() == (one.parent / "out" / image).read_bytes()


@pytest.mark.slow
def test_a_killed_run_resumes_without_redoing_finished_videos(one_process, tmp_path):
    one, _ = one_process
    jobs = write_jobs(tmp_path / "batch")
    out = jobs.parent / "out"
    run = generate_jobs(jobs)
    deadline = time.monotonic() + 120
    while not (out / "a.mp4").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    finished = {name: (out / f"{name}.mp4").stat().st_mtime_ns for name in GOOD if (out / f"{name}.mp4").exists()}
    assert "a" in finished and "d" not in finished  # killed in the middle

    # A video whose .mp4 is there but not all its companions is not finished (made again), and what a killed run
    # leaves half-written is cleaned up.
    for name in ("d.mp4", "d.reference-1.png", "d.reference-2.png"):
        shutil.copy(one.parent / "out" / name, out / name)
    (out / ".d.mp4.k1ll3d.mp4").write_bytes(b"half a video")

    result = finish(generate_jobs(jobs))
    assert result.returncode == 1, result.stderr[-3000:]
    expected = {name: "skipped" if name in finished else "done" for name in GOOD}
    assert statuses(jobs) == {**expected, "e": "failed"}
    assert {name: (out / f"{name}.mp4").stat().st_mtime_ns for name in finished} == finished
    for name in GOOD:
        assert np.array_equal(read_video(out / f"{name}.mp4"), read_video(one.parent / f"out/{name}.mp4"))
    assert (out / "d.sheet.png").read_bytes() == (one.parent / "out/d.sheet.png").read_bytes()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


GOOD_LINE = '{"prompt": "A woman waves on a beach at noon.", "output": "a.mp4"}'


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not JSON"),
    ('["A woman waves.", "b.mp4"]', "line 2: a job is a JSON object"),
    ('{"prompt": "x", "output": "b.mp4", "sede": 1}', "line 2: unknown key 'sede'"),
    ('{"output": "b.mp4"}', "line 2: no 'prompt'"),
    ('{"prompt": "x"}', "line 2: no 'output'"),
    ('{"prompt": "x", "output": "sub/../a.mp4"}', "line 2: {folder}/sub/../a.mp4 is also written by line 1"),
    ('{"prompt": "x", "output": "b.gif"}', "line 2: output must be an .mp4 file, got b.gif"),
    ('{"prompt": "", "output": "b.mp4"}', "line 2: prompt must not be empty"),
    ('{"prompt": "x", "output": "b.mp4", "steps": 0}', "line 2: steps must be at least 1, got 0"),
    ('{"prompt": "x", "output": "b.mp4", "seed": "3"}', 'line 2: seed must be a whole number, got "3"'),
    ('{"prompt": "x", "output": "b.mp4", "height": 32.5}', "line 2: height must be a whole number, got 32.5"),
    ('{"prompt": "x", "output": "b.mp4", "guidance": NaN}', "line 2: guidance must be a finite number >= 0"),
    ('{"prompt": "x", "output": "b.mp4", "reference": ["r.png", 3]}', "line 2: reference must be a path or a list"),
    ('{"prompt": "x", "output": "b.mp4", "reference": "a.sheet.png"}', "would overwrite the reference of line 2"),
])
def test_a_malformed_jobs_file_is_refused_naming_the_line_and_nothing_is_written(tmp_path, capsys, line, message):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(f"{GOOD_LINE}\n{line}\n")
    assert main(["generate", "--jobs", str(jobs)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {jobs}") and err.count("\n") == 1, err
    assert message.format(folder=tmp_path) in err
    assert [p.name for p in tmp_path.iterdir()] == ["jobs.jsonl"]


def test_flags_that_belong_to_each_video_are_refused_with_jobs(tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(GOOD_LINE + "\n")
    for extra, message in ((["--prompt", "x"], "--prompt goes in the jobs file"),
                           (["-o", "x.mp4"], "-o goes in the jobs file"),
                           (["--reference", "r.png"], "--reference goes in the jobs file"),
                           (["--parallel", "ulysses"], "--parallel is not available with --jobs"),
                           (["--control-reference", "r.png"], "--control-reference are not available with --jobs"),
                           (["--steps", "0"], "--steps must be at least 1")):
        assert main(["generate", "--jobs", str(jobs), *extra]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert main(["generate", "--jobs", str(tmp_path / "nothing.jsonl")]) == 1
    assert "nothing.jsonl: no such jobs file" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert main(["generate", "--jobs", str(tmp_path / "empty.jsonl")]) == 1
    assert "empty.jsonl: no jobs in it" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x"]) == 2  # neither -o nor --jobs
    assert "--prompt and -o are required (or --jobs FILE" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "jobs.jsonl"]


def test_every_video_setting_may_be_set_by_a_line():
    from standin.commands import VIDEO_SETTINGS
    from standin.jobs import JOB_KEYS

    assert set(JOB_KEYS) == set(VIDEO_SETTINGS)
