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
    assert PIL.Image.open(tmp_path / "out.sheet.png").size == (5 * 48, 32)
    # the reference as the model saw it: squared (white padding) and resized to the model's reference size
    assert PIL.Image.open(tmp_path / "out.reference.png").size == (32, 32)
    assert report["reference"] == str(tmp_path / "out.reference.png")
    assert report["contact_sheet"] == str(tmp_path / "out.sheet.png")
    # no temporary left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "out.reference.png", "out.sheet.png"]


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
    assert "no such reference image" in capsys.readouterr().err
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


def test_outputs_never_overwrite_an_input(model_folder, tmp_path, capsys):
    """`--reference x.png -o x.mp4` keeps x.png and writes x.reference.png / x.sheet.png beside it; an output
    that IS an input is refused before the generation, with nothing written."""
    import shutil

    reference = shutil.copy(model_folder / "face.png", tmp_path / "x.png")
    before = reference.read_bytes()
    args = ["generate", "--base", str(model_folder / "base"), "--adapter", str(model_folder / "adapter.safetensors"),
            "--prompt", "x", "--height", "32", "--width", "32", "--frames", "5", "--steps", "1", "--device", "cpu"]
    assert main(args + ["--reference", str(reference), "-o", str(tmp_path / "x.mp4")]) == 0
    assert reference.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.mp4", "x.png", "x.reference.png", "x.sheet.png"]
    capsys.readouterr()

    for clash in ("y.reference.png", "y.sheet.png"):
        shutil.copy(model_folder / "face.png", tmp_path / clash)
        before = (tmp_path / clash).read_bytes()
        assert main(args + ["--reference", str(tmp_path / clash), "-o", str(tmp_path / "y.mp4")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "would overwrite the reference" in err
        assert (tmp_path / clash).read_bytes() == before and not (tmp_path / "y.mp4").exists()
        (tmp_path / clash).unlink()
    assert not (tmp_path / "y.sheet.png").exists() and not (tmp_path / "y.reference.png").exists()


def test_without_a_reference_no_reference_file(model_folder, tmp_path, capsys):
    code = main(["generate", "--base", str(model_folder / "base"), "--prompt", "a person nods", "-o",
                 str(tmp_path / "plain.mp4"), "--height", "32", "--width", "32", "--frames", "5", "--steps", "1",
                 "--device", "cpu"])
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reference"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.mp4", "plain.sheet.png"]


@pytest.mark.parametrize("adapter", ["adapter.safetensors", "does-not-exist.ckpt"])
def test_adapter_without_base_is_an_error(model_folder, tmp_path, capsys, adapter):
    """It used to be ignored silently (the default model brings its own adapter)."""
    for flag in ("--adapter", "--adapter-low"):
        code = main(["generate", flag, str(model_folder / adapter), "--prompt", "x", "-o", str(tmp_path / "o.mp4")])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "need --base" in err
    assert not list(tmp_path.iterdir())


def test_sizes_fps_and_preprocessing_come_from_the_base(tmp_path, capsys):
    """Any base's config gives the defaults (here a tiny base saved with other ones); the flags override them."""
    from standin.video import companion_paths

    pipe = tiny_pipeline()
    pipe.register_to_config(default_height=16, default_width=32, default_num_frames=9, default_fps=5,
                            preprocess_reference=False, default_reference_guidance=2.0, default_guidance_scale=3.0)
    pipe.save_pretrained(tmp_path / "base")
    save_adapter(pipe.adapters["transformer"], tmp_path / "adapter.safetensors")
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(tmp_path / "ref.png")
    common = ["generate", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter.safetensors"),
              "--reference", str(tmp_path / "ref.png"), "--prompt", "x", "--steps", "1", "--device", "cpu"]
    assert main(common + ["-o", str(tmp_path / "a.mp4")]) == 0
    import imageio

    with imageio.get_reader(tmp_path / "a.mp4") as reader:
        assert reader.get_meta_data()["fps"] == 5
    assert read_video(tmp_path / "a.mp4").shape == (9, 16, 32, 3)
    # preprocess_reference False: the reference is only squared, here already square at the model's size
    seen = np.asarray(PIL.Image.open(companion_paths(tmp_path / "a.mp4")[0]))
    assert np.array_equal(seen, pixels)
    # identity guidance: the base's 2 unless asked (1, the published sampler, differs)
    for name, g_ref in (("g2.mp4", "2"), ("g1.mp4", "1")):
        assert main(common + ["-o", str(tmp_path / name), "--reference-guidance", g_ref]) == 0
    assert np.array_equal(read_video(tmp_path / "a.mp4"), read_video(tmp_path / "g2.mp4"))
    assert not np.array_equal(read_video(tmp_path / "a.mp4"), read_video(tmp_path / "g1.mp4"))
    # text guidance likewise: the base's 3 unless asked (Wan's 5 differs)
    for name, scale in (("t3.mp4", "3"), ("t5.mp4", "5")):
        assert main(common + ["-o", str(tmp_path / name), "--guidance", scale]) == 0
    assert np.array_equal(read_video(tmp_path / "a.mp4"), read_video(tmp_path / "t3.mp4"))
    assert not np.array_equal(read_video(tmp_path / "a.mp4"), read_video(tmp_path / "t5.mp4"))
    assert main(common + ["-o", str(tmp_path / "b.mp4"), "--height", "32", "--frames", "5", "--fps", "7"]) == 0
    with imageio.get_reader(tmp_path / "b.mp4") as reader:
        assert reader.get_meta_data()["fps"] == 7
    assert read_video(tmp_path / "b.mp4").shape == (5, 32, 32, 3)


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "(default: False)" not in out
    for line in out.split("  -")[1:]:
        assert line.count("(default") <= 1, line


def test_reference_with_base_needs_its_adapter(model_folder, tmp_path, capsys):
    code = main(["generate", "--base", str(model_folder / "base"), "--reference", str(model_folder / "face.png"),
                 "--prompt", "x", "-o", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--adapter" in err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra, message", [(["--device", "banana"], "unknown --device 'banana'"),
                                            (["--steps", "0"], "--steps must be at least 1"),
                                            (["--fps", "0"], "--fps must be at least 1")])
def test_bad_settings_are_one_line_errors_before_any_work(model_folder, tmp_path, capsys, extra, message):
    code = main(["generate", "--base", str(model_folder / "base"), "--prompt", "x", "-o", str(tmp_path / "o.mp4"),
                 *extra])
    err = capsys.readouterr().err
    assert code == 1 and err == f"error: {err[7:]}" and err.count("\n") == 1 and message in err
    assert not list(tmp_path.iterdir())


def test_two_references_and_reference_guidance_from_the_cli(model_folder, tmp_path, capsys):
    assert generate(model_folder, tmp_path / "two.mp4", "--reference", str(model_folder / "face.png"),
                    "--reference-guidance", "2", "--reference-guidance-steps", "1") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["references"] == [str(tmp_path / "two.reference-1.png"), str(tmp_path / "two.reference-2.png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "two.mp4", "two.reference-1.png", "two.reference-2.png", "two.sheet.png"]


@pytest.mark.parametrize("flag, value", [("--guidance", "inf"), ("--guidance", "nan"), ("--guidance", "-5"),
                                         ("--reference-guidance", "nan"), ("--seed", "-1"), ("--steps", "0")])
def test_impossible_numbers_are_refused_before_any_work(model_folder, tmp_path, capsys, flag, value):
    assert generate(model_folder, tmp_path / "out.mp4", flag, value) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and flag in err
    assert not any(tmp_path.iterdir())


def test_generated_video_records_its_provenance(model_folder, tmp_path):
    from standin.provenance import file_sha256, read_metadata

    assert generate(model_folder, tmp_path / "out.mp4", "--seed", "7") == 0
    tags = read_metadata(tmp_path / "out.mp4")
    assert tags["ai_generated"] == "true" and tags["seed"] == "7" and tags["prompt"] == "a person nods"
    assert tags["adapter_sha256"] == file_sha256(model_folder / "adapter.safetensors")


def test_unwritable_output_and_a_folder_as_reference_fail_before_any_work(model_folder, tmp_path, capsys):
    assert main(["generate", "--base", str(model_folder / "base"), "--adapter", str(model_folder / "adapter.safetensors"),
                 "--reference", str(model_folder / "face.png"), "--prompt", "x", "-o", "/proc/x.mp4"]) == 1
    assert "cannot write in /proc" in capsys.readouterr().err
    assert main(["generate", "--base", str(model_folder / "base"), "--adapter", str(model_folder / "adapter.safetensors"),
                 "--reference", str(tmp_path), "--prompt", "x", "-o", str(tmp_path / "x.mp4")]) == 1
    assert "is a folder, not a reference image" in capsys.readouterr().err


def test_attention_backend_and_parallel_flags(model_folder, tmp_path, capsys, monkeypatch):
    import socket

    import torch.distributed as dist

    assert generate(model_folder, tmp_path / "math.mp4", "--attention-backend", "_native_math") == 0
    assert generate(model_folder, tmp_path / "x.mp4", "--attention-backend", "banana") == 1
    assert "unknown --attention-backend 'banana'" in capsys.readouterr().err
    assert generate(model_folder, tmp_path / "x.mp4", "--parallel", "ulysses") == 1
    assert "runs under torchrun" in capsys.readouterr().err
    # A one-process group, as torchrun would set it up: ring needs a log-sum-exp backend, which CPUs lack.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    try:
        assert generate(model_folder, tmp_path / "x.mp4", "--parallel", "ring") == 1
        assert "needs a GPU attention backend" in capsys.readouterr().err
        from standin.commands import context_parallel_config

        with pytest.raises(ValueError, match="on one machine use --parallel ulysses or ring"):
            context_parallel_config("unified")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["math.mp4", "math.reference.png", "math.sheet.png"]


def test_a_video_that_cannot_be_written_leaves_no_companion_files(model_folder, tmp_path, capsys, monkeypatch):
    import standin.video
    from standin.video import VideoWriteError

    def full_disk(*args, **kwargs):
        raise VideoWriteError(28, "out.mp4: writing the video failed (No space left on device)")

    monkeypatch.setattr(standin.video, "save_video", full_disk)
    assert generate(model_folder, tmp_path / "out.mp4") == 1
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
