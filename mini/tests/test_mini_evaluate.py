"""The mini results table runs end to end and measures what it says (here on a tiny random model)."""

import json
from dataclasses import replace

import pytest
from PIL import Image

from standin.checkpoint import save_adapter
from standin_mini.evaluate import main
from standin_mini.prompts import parse_prompt
from standin.tiny import tiny_pipeline


@pytest.mark.slow
def test_table_json_and_comparison_sheet(tmp_path):
    pipe = tiny_pipeline(reference_size=64)
    pipe.save_pretrained(tmp_path / "base")
    save_adapter(pipe.adapters["transformer"], tmp_path / "adapter.safetensors")
    assert main(["--base", str(tmp_path / "base"), "--adapter", f"standin={tmp_path / 'adapter.safetensors'}",
                 "--adapter", f"twice={tmp_path / 'adapter.safetensors'}", "--count", "2", "--steps", "2",
                 "--reference-clips", "4", "--guidance", "3", "--out", str(tmp_path / "results")]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["guidance"] == 3.0
    assert set(report["summary"]) == {"world", "vae", "base", "standin", "twice"}
    # Reference use: the loss without a reference is the base's, whatever the adapter; the same adapter twice gives
    # the same numbers; a reference changes the prediction.
    use = report["reference_use"]["loss"]
    assert use["standin"] == use["twice"] and set(use["standin"]) == {
        f"{case}@{sigma}" for case in ("right", "base", "wrong") for sigma in (0.5, 0.8, 0.95)}
    assert all(use["standin"][f"right@{s}"] != use["standin"][f"base@{s}"] for s in (0.5, 0.8, 0.95))
    # Prompt use: the base's loss with the own prompt is the reference-free loss above (same clips, same noise);
    # each other case changes exactly its part of every prompt.
    reads = report["prompt_use"]
    for sigma in (0.5, 0.8, 0.95):
        assert sum(reads["loss"][f"own@{sigma}"]) / 4 == pytest.approx(use["standin"][f"base@{sigma}"], rel=1e-6)
    own = [parse_prompt(text) for text in reads["prompts"]["own"]]
    for part in ("action", "place", "time"):
        for prompt, text in zip(own, reads["prompts"][part]):
            changed = parse_prompt(text)
            assert getattr(changed, part) != getattr(prompt, part)
            assert replace(changed, **{part: getattr(prompt, part)}) == prompt
    assert set(reads["predicted_motion"]) == {"0.5", "0.8", "0.95"} and reads["clip_motion"] > 0
    assert "action replaced" in (tmp_path / "results.md").read_text()
    world = report["summary"]["world"]
    # The world's own renders are the ceiling: the identity model finds the face and the rules hold.
    assert world["face_rate"] > 0.9 and world["face_sim"] > 0.5 and world["place"] == 1.0
    assert len(report["clips"]["standin"]) == 2
    assert "(b) Stand-In" in (tmp_path / "results.md").read_text()
    assert Image.open(tmp_path / "results.png").size == (7 * 64, 2 * 5 * 64)


def test_gain_over_the_base_is_paired_and_skips_clips_without_a_face():
    from standin_mini.evaluate import summarize

    def rows(face_sims):
        return [{"face_sim": f, "face_rate": 1.0, "motion": 0.5, "copy_paste": 0.0, "action_ok": True,
                 "place_ok": True, "time_ok": False} for f in face_sims]

    summary = summarize(rows([0.5, 0.7, None, 0.9]), rows([0.1, 0.2, 0.3, None]))
    assert summary["gain"] == pytest.approx(0.45)  # clips 1 and 2 only: (0.4 + 0.5) / 2
    assert summary["gain_ci95"] == pytest.approx(1.96 * 0.0707107 / 2 ** 0.5, rel=1e-4)
    assert summarize(rows([0.5]))["gain"] is None


def test_frame_change_is_the_mean_square_change_between_frames():
    import torch
    from standin_mini.evaluate import frame_change

    still = torch.randn(2, 16, 1, 8, 8).expand(2, 16, 5, 8, 8)
    assert frame_change(still) == 0
    steps = torch.arange(5.0).view(1, 1, 5, 1, 1).expand(2, 16, 5, 8, 8)
    assert frame_change(3 * steps) == 9
