"""Issue 17, training: a resumed run continues the run it names or refuses in one line. The same folders given
another way are the same; changed data, fewer steps, a second `standin train` in the folder and damaged
checkpoint files are refused with what to do; a killed run's lock does not block."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_config
from safetensors.torch import load_file

from standin.cli import main
from standin.train import run_state
from standin.train.run_state import CheckpointError, RunFolderInUse, RunLock
from standin.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = dict(steps=4, batch_size=1, checkpoint_every=2, keep_checkpoints=3)


def adapter(run: Path) -> dict:
    return load_file(str(run / "adapter.safetensors"))


def same_adapter(a: Path, b: Path) -> bool:
    x, y = adapter(a), adapter(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def finished(tiny_base, encoded_data, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (a pattern to copy, never changed)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    Trainer(train_config(tiny_base, encoded_data, run, **SETTINGS)).train()
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def cli_train(base, data, run, *extra) -> list[str]:
    args = ["train", "--base", str(base), "--data", str(data), "-o", str(run), "--num-workers", "0",
            "--val-count", "0", "--no-progress", "--rank", "8", "--lr", "0.01", "--warmup-steps", "2"]
    args += [f"--{key.replace('_', '-')}={value}" for key, value in SETTINGS.items()]
    return args + list(extra)


def one_line_error(capsys) -> str:
    """The error line (model loading may have drawn its progress bars on stderr before it)."""
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1] if err else ""
    assert last.startswith("error: ") and "Traceback" not in err, err
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1, err
    return last


# ---- resume checks --------------------------------------------------------------------------------------------


def test_the_same_folders_given_relative_or_absolute_are_the_same_run(tiny_base, encoded_data, tmp_path,
                                                                        monkeypatch):
    run = tmp_path / "run"
    Trainer(train_config(tiny_base, encoded_data, run, **{**SETTINGS, "steps": 2})).train()
    monkeypatch.chdir(encoded_data.parent)
    base = os.path.relpath(tiny_base, encoded_data.parent)
    report = Trainer(train_config(base, encoded_data.name, run, resume=True, **SETTINGS)).train()
    assert report["resumed_from_step"] == 2 and report["steps"] == 4
    # a folder that really is another one is still refused
    other = tmp_path / "other_data"
    shutil.copytree(encoded_data, other)
    with pytest.raises(ValueError, match="data: '.*dataset' -> '.*other_data'"):
        Trainer(train_config(base, other, run, resume=True, **{**SETTINGS, "steps": 6}))


def test_a_dataset_changed_in_place_is_refused(tiny_base, encoded_data, finished, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(encoded_data, data)
    run = tmp_path / "run"
    Trainer(train_config(tiny_base, data, run, **{**SETTINGS, "steps": 2})).train()
    manifest_file = data / "manifest.json"
    manifest = json.loads(manifest_file.read_text())

    # fewer clips (3 -> 2)
    manifest_file.write_text(json.dumps({**manifest, "clips": manifest["clips"][:2]}))
    with pytest.raises(ValueError, match="had 3 clips at step-0000002, it has 2 now"):
        Trainer(train_config(tiny_base, data, run, resume=True, **SETTINGS))

    # as many clips, other contents: a caption changed, or a clip file replaced by another one
    changed = json.loads(json.dumps(manifest))
    changed["clips"][0]["caption"] = "something else"
    manifest_file.write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="manifest or the clip files .* changed"):
        Trainer(train_config(tiny_base, data, run, resume=True, **SETTINGS))
    manifest_file.write_text(json.dumps(manifest, indent=2))
    latents = data / manifest["clips"][0]["latents"]
    shutil.copyfile(latents, tmp_path / "kept")
    latents.write_bytes(latents.read_bytes() + b"\0" * 64)
    with pytest.raises(ValueError, match="manifest or the clip files .* changed"):
        Trainer(train_config(tiny_base, data, run, resume=True, **SETTINGS))

    # the dataset as it was: the run resumes (the manifest's exact bytes are part of the fingerprint)
    shutil.copyfile(tmp_path / "kept", latents)
    manifest_file.write_bytes((encoded_data / "manifest.json").read_bytes())
    assert Trainer(train_config(tiny_base, data, run, resume=True, **SETTINGS)).train()["steps"] == 4


def test_resume_with_fewer_steps_is_refused_and_the_report_kept(tiny_base, encoded_data, finished, tmp_path,
                                                                capsys):
    run = copy_run(finished, tmp_path)
    report = (run / "report.json").read_bytes()
    code = main(cli_train(tiny_base, encoded_data, run, "--resume", "--steps", "2"))
    assert code == 1
    assert "--steps 2 is below the step of the checkpoint to resume" in one_line_error(capsys)
    assert (run / "report.json").read_bytes() == report

    # the same steps again: nothing to do, the finished report is returned, not rewritten with no losses
    returned = Trainer(train_config(tiny_base, encoded_data, run, resume=True, **SETTINGS)).train()
    assert (run / "report.json").read_bytes() == report and returned == json.loads(report)
    assert returned["loss_first"] is not None


# ---- one run per folder ---------------------------------------------------------------------------------------


def test_a_second_train_into_a_folder_in_use_is_refused(tiny_base, encoded_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / run_state.LOCK_FILE).write_text(json.dumps(
            {"pid": holder.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}))
        code = main(cli_train(tiny_base, encoded_data, run))
        assert code == 1
        assert f"is in use by process {holder.pid}" in one_line_error(capsys)
        assert sorted(p.name for p in run.iterdir()) == [run_state.LOCK_FILE]  # nothing written, lock kept
    finally:
        holder.kill()
        holder.wait()

    # in one process: the first trainer holds the folder until it has trained
    first = Trainer(train_config(tiny_base, encoded_data, tmp_path / "two", **SETTINGS))
    with pytest.raises(RunFolderInUse, match=f"in use by process {os.getpid()}"):
        Trainer(train_config(tiny_base, encoded_data, tmp_path / "two", **SETTINGS))
    first.train()
    assert not (tmp_path / "two" / run_state.LOCK_FILE).exists()


def test_a_killed_runs_lock_is_taken_over_and_said_so(tiny_base, encoded_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid is free now
    (run / run_state.LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    Trainer(train_config(tiny_base, encoded_data, run, **{**SETTINGS, "steps": 2})).train()
    log = (run / "train.log").read_text()
    assert f"lock {run / run_state.LOCK_FILE} from process {gone.pid}" in log and "no longer running" in log
    assert not (run / run_state.LOCK_FILE).exists()  # removed on exit


def test_the_lock_is_removed_when_setup_fails_and_respected_across_hosts(tiny_base, encoded_data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="(?i)scheduler"):
        Trainer(train_config(tiny_base, encoded_data, run, lr_scheduler="no-such-schedule")).train()
    assert not (run / run_state.LOCK_FILE).exists()
    # a lock of another machine cannot be checked: it is respected, with its host named
    (run / run_state.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(RunFolderInUse, match="process 1 on host elsewhere"):
        RunLock(run).acquire()
    # an unreadable lock (a writer killed before writing its pid) blocks only while it is fresh
    (run / run_state.LOCK_FILE).write_text("")
    with pytest.raises(RunFolderInUse, match="being written"):
        RunLock(run).acquire()
    os.utime(run / run_state.LOCK_FILE, (0, 0))
    lock = RunLock(run).acquire()
    assert json.loads((run / run_state.LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / run_state.LOCK_FILE).exists()


# ---- damaged checkpoint files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b'{"folder": "step-00', b"\x00\xff garbage", b'{"step": 4}',
                                     b'{"folder": "../../etc"}', b"[1, 2]"])
def test_a_damaged_latest_json_is_one_line_naming_the_file_and_the_fallback(tiny_base, encoded_data, finished,
                                                                           tmp_path, capsys, content):
    run = copy_run(finished, tmp_path)
    latest = run / run_state.CHECKPOINTS / run_state.LATEST
    latest.write_bytes(content)
    assert main(cli_train(tiny_base, encoded_data, run, "--resume", "--steps", "6")) == 1
    err = one_line_error(capsys)
    assert f"{latest} is damaged" in err and "continues from step-0000004, the newest complete checkpoint left" in err
    # without --resume the damaged pointer still protects the run
    assert main(cli_train(tiny_base, encoded_data, run)) == 1
    assert f"{latest} is damaged" in one_line_error(capsys)


def test_a_pointer_to_a_missing_checkpoint_names_the_older_one(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "checkpoints/step-0000004")
    with pytest.raises(CheckpointError, match="names step-0000004, which lacks .* continues from "
                                              "step-0000002"):
        run_state.latest_checkpoint(run)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong keys", "not a dict", "bad optimizer",
                                    "adapter truncated"])
def test_a_damaged_checkpoint_is_one_line_and_its_advice_gets_the_run_back(tiny_base, encoded_data, finished,
                                                                          tmp_path, capsys, damage):
    run = copy_run(finished, tmp_path)
    folder = run / "checkpoints/step-0000004"
    state_file = folder / run_state.STATE_FILE
    if damage == "truncated":
        truncate(state_file)
    elif damage == "garbage":
        state_file.write_bytes(os.urandom(2000))
    elif damage == "wrong keys":
        torch.save({"steps": 4, "optim": {}}, state_file)
    elif damage == "not a dict":
        torch.save([1, 2, 3], state_file)
    elif damage == "bad optimizer":
        state = torch.load(state_file, weights_only=True)
        torch.save({**state, "optimizer": {"state": {}, "param_groups": "x"}}, state_file)
    else:
        truncate(folder / run_state.ADAPTER_FILE)
    damaged_file = folder / (run_state.ADAPTER_FILE if damage == "adapter truncated" else run_state.STATE_FILE)

    assert main(cli_train(tiny_base, encoded_data, run, "--resume", "--steps", "6")) == 1
    err = one_line_error(capsys)
    assert f"{damaged_file} is damaged" in err
    assert f"remove {folder} and {run / 'checkpoints/latest.json'}" in err
    assert "continues from step-0000002, the newest complete checkpoint left" in err

    if damage != "truncated":
        return
    # Following the advice: the run continues from step 2 and ends as the uninterrupted run.
    shutil.rmtree(folder)
    (run / "checkpoints/latest.json").unlink()
    assert run_state.latest_checkpoint(run).name == "step-0000002"
    report = Trainer(train_config(tiny_base, encoded_data, run, resume=True, **SETTINGS)).train()
    assert report["resumed_from_step"] == 2
    assert same_adapter(run, finished)


def test_no_older_checkpoint_says_to_start_afresh(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "checkpoints/step-0000002")
    truncate(run / "checkpoints/step-0000004" / run_state.STATE_FILE)
    with pytest.raises(CheckpointError, match="no older complete checkpoint is left: remove .*checkpoints to start"):
        run_state.read_training_state(run / "checkpoints/step-0000004")


def test_a_hand_edited_manifest_with_a_non_text_caption_is_refused_naming_the_clip(tiny_base, encoded_data,
                                                                                  tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(encoded_data, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["clips"][1]["caption"] = 5
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert main(cli_train(tiny_base, data, tmp_path / "run")) == 1
    assert f"clip {manifest['clips'][1]['id']} has caption 5, not text" in one_line_error(capsys)
    (data / "manifest.json").write_text("{not json")
    assert main(cli_train(tiny_base, data, tmp_path / "run")) == 1
    assert "manifest.json is not valid JSON" in one_line_error(capsys)


@pytest.mark.slow
def test_two_real_runs_into_one_folder_then_a_kill(tiny_base, encoded_data, tmp_path, capsys):
    """`standin train` running in another process holds the folder; once it is killed (SIGKILL: no cleanup, the
    lock stays behind) a resumed run takes the lock over and finishes."""
    import signal
    import time

    from conftest import REPO

    run = tmp_path / "run"
    args = cli_train(tiny_base, encoded_data, run) + ["--steps=400", "--checkpoint-every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen([sys.executable, "-m", "standin.cli", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while run_state.latest_checkpoint(run) is None and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1].decode()[-2000:]
        assert main(args + ["--resume"]) == 1
        assert f"is in use by process {first.pid}" in one_line_error(capsys)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.loads((run / run_state.LOCK_FILE).read_text())["pid"] == first.pid  # left behind by the kill
    killed_at = int(run_state.latest_checkpoint(run).name.split("-")[1])
    assert main(args + [f"--steps={killed_at + 2}", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from_step"] == killed_at
    assert f"from process {first.pid} (started" in (run / "train.log").read_text()
    assert not (run / run_state.LOCK_FILE).exists()


# ---- nothing the user had is lost ----------------------------------------------------------------------------


def test_a_finished_run_without_checkpoints_is_never_replaced(tiny_base, encoded_data, finished, tmp_path):
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "checkpoints")
    before = {name: (run / name).read_bytes() for name in ("report.json", "adapter.safetensors")}
    for resume in (False, True):
        with pytest.raises(FileExistsError, match="holds a run's report.json and adapter.safetensors but no "
                                                  "checkpoint"):
            Trainer(train_config(tiny_base, encoded_data, run, resume=resume, **SETTINGS))
    assert {name: (run / name).read_bytes() for name in before} == before
    assert not (run / run_state.LOCK_FILE).exists()


def test_resuming_exactly_at_the_last_checkpoint_writes_the_runs_adapter(tiny_base, encoded_data, finished,
                                                                       tmp_path):
    """A 4-step run stopped after its step-2 checkpoint, resumed with --steps 2: nothing to train, but the run's
    adapter and report are written (from the checkpoint), not a report pointing at a missing adapter."""
    run = copy_run(finished, tmp_path)
    for name in ("report.json", "adapter.safetensors", "checkpoints/latest.json"):
        (run / name).unlink()
    shutil.rmtree(run / "checkpoints/step-0000004")
    report = Trainer(train_config(tiny_base, encoded_data, run, resume=True, **{**SETTINGS, "steps": 2})).train()
    assert report["steps"] == 2 and json.loads((run / "report.json").read_text())["steps"] == 2
    checkpoint = run / "checkpoints/step-0000002/adapter.safetensors"
    assert (run / "adapter.safetensors").read_bytes() == checkpoint.read_bytes()


def test_a_clip_size_validation_cannot_generate_is_refused_before_training(tiny_base, encoded_data, tmp_path):
    with pytest.raises(ValueError, match="clip size 32x24, 9 frames .*multiples of 16"):
        Trainer(train_config(tiny_base, encoded_data, tmp_path / "run", height=24))
    assert not (tmp_path / "run" / run_state.LOCK_FILE).exists()
