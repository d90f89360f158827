"""`standin generate` and `standin convert` end to end on a tiny model folder."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from standin.checkpoint import save_adapter
from standin.cli import main
from standin.tiny import tiny_pipeline
from standin.video import read_video


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    pipe = tiny_pipeline()
    pipe.save_pretrained(folder / "base")  # the adapter is not a pipeline component: the folder stays a base
    save_adapter(pipe.adapters["transformer"], folder / "adapter.safetensors")
    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(folder / "face.png")
    return folder


def generate(folder, output, *extra):
    return main(["generate", "--base", str(folder / "base"), "--adapter", str(folder / "adapter.safetensors"),
                 "--reference", str(folder / "face.png"), "--prompt", "a person nods", "-o", str(output),
                 "--height", "32", "--width", "48", "--frames", "5", "--steps", "2", "--no-preprocess",
                 "--device", "cpu", *extra])


def test_generate_writes_a_playable_video_and_a_contact_sheet(model_folder, tmp_path, capsys):
    assert generate(model_folder, tmp_path / "out.mp4") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    frames = read_video(tmp_path / "out.mp4")
    assert frames.shape == (5, 32, 48, 3) and report["frames"] == 5
    assert PIL.Image.open(tmp_path / "out.png").size == (5 * 48, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "out.png"]  # no temporary left behind


def test_same_seed_same_video_other_seed_other_video(model_folder, tmp_path):
    for name, seed in (("a.mp4", "0"), ("b.mp4", "0"), ("c.mp4", "1")):
        assert generate(model_folder, tmp_path / name, "--seed", seed, "--no-cache") == 0
    a, b, c = (read_video(tmp_path / name).astype(int) for name in ("a.mp4", "b.mp4", "c.mp4"))
    assert np.array_equal(a, b) and np.abs(a - c).mean() > 1


def test_bad_inputs_fail_clearly_and_write_nothing(model_folder, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert generate(model_folder, tmp_path / "file" / "out.mp4") == 1
    assert "it is a file" in capsys.readouterr().err
    assert generate(model_folder, tmp_path / "out.gif") == 1
    assert "must be an .mp4" in capsys.readouterr().err
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = ["generate", "--base", str(model_folder / "base"), "--adapter", str(model_folder / "adapter.safetensors"),
            "--prompt", "x", "-o", str(tmp_path / "out.mp4"), "--height", "32", "--width", "32", "--frames", "5",
            "--steps", "1", "--device", "cpu", "--no-preprocess"]
    assert main(args + ["--reference", str(tmp_path / "broken.png")]) == 1
    assert "broken.png" in capsys.readouterr().err
    assert main(args + ["--reference", str(tmp_path / "nothing.png")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(args + ["--reference", str(model_folder / "face.png"), "--frames", "6"]) == 1
    assert "4k+1" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mp4"))


def test_wrong_adapter_for_the_base_is_reported(model_folder, tmp_path, capsys):
    wrong = {f"blocks.{i}.self_attn.{p}_loras.{part}.weight": torch.zeros(*shape)
             for i in range(2) for p in "qkv" for part, shape in (("down", (4, 40)), ("up", (40, 4)))}
    torch.save(wrong, tmp_path / "wrong.ckpt")
    code = main(["generate", "--base", str(model_folder / "base"), "--adapter", str(tmp_path / "wrong.ckpt"),
                 "--reference", str(model_folder / "face.png"), "--prompt", "x", "-o", str(tmp_path / "o.mp4"),
                 "--device", "cpu"])
    assert code == 1 and "width 40" in capsys.readouterr().err


def test_convert_command(model_folder, tmp_path, capsys):
    from safetensors.torch import load_file

    state = load_file(str(model_folder / "adapter.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "Stand-In_wan2.1_T2V_14B_ver1.0.ckpt")
    assert main(["convert", str(tmp_path / "Stand-In_wan2.1_T2V_14B_ver1.0.ckpt"),
                 "-o", str(tmp_path / "out.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] == len(state)
    converted = load_file(str(tmp_path / "out.safetensors"))
    assert all(torch.equal(converted[k], state[k]) for k in state)
    assert main(["convert", str(tmp_path / "nope.ckpt"), "-o", str(tmp_path / "x.safetensors")]) == 1
