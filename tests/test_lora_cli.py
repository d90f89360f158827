"""`standin generate --lora FILE[:SCALE] --preset lightx2v` end to end on a tiny model folder."""

import json

import numpy as np
import PIL.Image
import pytest

from standin.checkpoint import save_adapter
from standin.cli import main
from standin.tiny import tiny_pipeline, tiny_transformer
from standin.video import read_video
from test_lora import lora_weights, write_lora

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    pipe = tiny_pipeline()
    pipe.save_pretrained(folder / "base")
    save_adapter(pipe.adapters["transformer"], folder / "adapter.safetensors")
    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(folder / "face.png")
    write_lora(lora_weights(pipe.transformer), folder / "style.safetensors", "community")
    write_lora(lora_weights(tiny_transformer("medium")), folder / "other_base.safetensors", "diffusers")
    (folder / "notes.safetensors").write_text("not a LoRA")
    return folder


def generate(folder, output, *extra):
    return main(["generate", "--base", str(folder / "base"), "--adapter", str(folder / "adapter.safetensors"),
                 "--reference", str(folder / "face.png"), "--prompt", "a person nods", "-o", str(output),
                 "--height", "32", "--width", "32", "--frames", "5", "--steps", "2", "--no-preprocess",
                 "--device", "cpu", *extra])


def test_generate_with_a_lora_and_its_scale(model_folder, tmp_path, capsys):
    assert generate(model_folder, tmp_path / "plain.mp4") == 0
    assert generate(model_folder, tmp_path / "zero.mp4", "--lora", f"{model_folder / 'style.safetensors'}:0") == 0
    assert generate(model_folder, tmp_path / "styled.mp4", "--lora", f"{model_folder / 'style.safetensors'}:1.5") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["frames"] == 5
    plain, zero, styled = (np.asarray(read_video(tmp_path / f"{n}.mp4")[0], np.float32)
                           for n in ("plain", "zero", "styled"))
    assert np.array_equal(plain, zero) and np.abs(plain - styled).mean() > 1


def test_preset_runs_four_steps(model_folder, tmp_path, capsys, monkeypatch):
    from standin.pipeline import StandInPipeline

    seen = {}
    original = StandInPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.update(steps=kwargs["num_inference_steps"], guidance=kwargs["guidance_scale"],
                    shift=self.scheduler.config.shift)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StandInPipeline, "__call__", spy)
    args = ["--base", str(model_folder / "base"), "--prompt", "a person nods", "--height", "32", "--width", "32",
            "--frames", "5", "--device", "cpu", "--preset", "lightx2v"]
    assert main(["generate", *args, "-o", str(tmp_path / "fast.mp4")]) == 0
    assert seen == {"steps": 4, "guidance": 1.0, "shift": 5.0}
    assert main(["generate", *args, "--steps", "3", "-o", str(tmp_path / "three.mp4")]) == 0
    assert seen["steps"] == 3 and seen["guidance"] == 1.0
    # a --guidance given wins even where it is the base's own (5 for Wan)
    assert main(["generate", *args, "--guidance", "5", "-o", str(tmp_path / "guided.mp4")]) == 0
    assert seen == {"steps": 4, "guidance": 5.0, "shift": 5.0}


@pytest.mark.parametrize("lora, message", [
    ("other_base.safetensors", "another base"),
    ("notes.safetensors", "not a LoRA file"),
    ("missing.safetensors", "not found"),
    ("style.safetensors:inf", "finite"),
])
def test_bad_loras_fail_in_one_line_and_write_nothing(model_folder, tmp_path, capsys, lora, message):
    output = tmp_path / "out.mp4"
    assert generate(model_folder, output, "--lora", str(model_folder / lora)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]  # (other lines on stderr: loading progress bars)
    assert list(tmp_path.iterdir()) == []


def test_a_low_noise_lora_needs_two_experts(model_folder, tmp_path, capsys):
    assert generate(model_folder, tmp_path / "out.mp4", "--lora-low", str(model_folder / "style.safetensors")) == 1
    assert "transformer_2" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
