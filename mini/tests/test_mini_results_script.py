"""mini/results.sh, the one command behind README's results: every stage runs, and a rerun redoes nothing that is
done (a killed training resumes by `standin train --resume`, tested in tests/test_train.py). Here on a tiny random
base at toy sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from standin.tiny import tiny_pipeline

SCRIPT = Path(__file__).parents[1] / "results.sh"


def run_script(base, runs):
    env = {**os.environ, "CLIPS": "8", "STEPS": "2", "COUNT": "1", "REFERENCE_CLIPS": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # this environment's standin
    return subprocess.run(["bash", str(SCRIPT), str(base), str(runs)], check=False, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_results_script_trains_three_adapters_writes_three_tables_and_resumes(tmp_path):
    base = tiny_pipeline(reference_size=64)
    base.register_to_config(default_guidance_scale=2.0)  # as the mini base records its own
    base.save_pretrained(tmp_path / "base")
    runs = tmp_path / "runs"
    first = run_script(tmp_path / "base", runs)
    assert first.returncode == 0, first.stderr[-3000:]

    for variant, attention, positions in [("standin", "restricted", "shifted"), ("vanilla", "vanilla", "shifted"),
                                          ("shared", "restricted", "shared")]:
        report = json.loads((runs / variant / "report.json").read_text())
        assert report["steps"] == 2 and report["dataset_size"] == 8
        with safe_open(runs / variant / "adapter.safetensors", "pt") as adapter:
            assert (adapter.metadata()["attention"], adapter.metadata()["positions"]) == (attention, positions)
    tables = {stem: json.loads((runs / f"{stem}.json").read_text())
              for stem in ("mini_results", "mini_results_guidance5", "mini_results_guidance1")}
    assert [tables[s]["guidance"] for s in tables] == [2.0, 5.0, 1.0]  # the base's default text guidance, then 5, 1
    for table in tables.values():
        assert {"base", "standin", "vanilla", "shared"} <= set(table["summary"])
    assert {"g_ref 4", "g_ref 3"} <= set(tables["mini_results"]["summary"])
    assert [tables[s]["reference_use"]["clips"] for s in tables] == [1, 1, 0]

    # A rerun finds everything done: no clip re-encoded, no adapter retrained, no table rewritten (prepare refreshes
    # its manifest, nothing else).
    written = {path: path.stat().st_mtime_ns for path in runs.rglob("*")
               if path.suffix in (".safetensors", ".json") and path.parent != runs / "data"}
    assert len([path for path in written if path.suffix == ".safetensors"]) > 8 + 3
    second = run_script(tmp_path / "base", runs)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {path: path.stat().st_mtime_ns for path in written} == written
