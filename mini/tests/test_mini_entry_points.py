"""standin finds this package only through its entry points: each resolves after `pip install -e mini/` and gives
what the product expects."""

import json
from importlib.metadata import entry_points
from pathlib import Path

from standin.plugins import COMMANDS, DATASETS, FACE_BACKENDS, MODELS, load


def test_every_group_registers_mini():
    for group in (MODELS, FACE_BACKENDS, DATASETS, COMMANDS):
        assert "mini" in {entry.name for entry in entry_points(group=group)}, group


def test_default_model_is_the_shipped_base_and_adapter():
    model = load(MODELS, "mini")()
    assert set(model) == {"base", "adapter"}
    config = json.loads((Path(model["base"]) / "model_index.json").read_text())
    assert config["_class_name"] == "StandInPipeline"
    assert (config["default_height"], config["default_width"], config["default_num_frames"],
            config["default_fps"], config["preprocess_reference"]) == (64, 64, 17, 8, False)
    # chosen on held-out identities, confirmed on others (docs/compositions.md, identity guidance;
    # docs/mini_text_guidance.json, text guidance)
    assert (config["default_reference_guidance"], config["default_guidance_scale"]) == (4.0, 2.0)
    assert Path(model["adapter"]).is_file() and model["adapter"].endswith(".safetensors")


def test_face_backend_by_name():
    from standin.faces import get_backend
    from standin_mini.identity import MiniFaceBackend

    assert load(FACE_BACKENDS, "mini") is MiniFaceBackend
    assert isinstance(get_backend("mini"), MiniFaceBackend)


def test_dataset_by_name_carries_its_settings():
    from standin.train.data import is_named_dataset, named_dataset

    assert is_named_dataset("mini")
    dataset = named_dataset("mini", "test", 2, None, None, None, 64)
    assert len(dataset) == 2
    assert {k: dataset.settings[k] for k in ("num_frames", "height", "width", "fps")} == dict(
        num_frames=17, height=64, width=64, fps=8)
    item = dataset[0]
    assert item["video"].shape == (3, 17, 64, 64) and item["reference"].shape == (3, 1, 64, 64)
    smaller = named_dataset("mini", "train", 1, 5, 32, 48, 32)
    assert smaller.settings["num_frames"] == 5 and smaller[0]["video"].shape == (3, 5, 32, 48)


def test_mini_commands_are_standin_commands():
    from standin.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert "mini" in commands
