"""The benchmark runs and reports every number it promises (timings themselves are not asserted here)."""

import json
import math

import pytest

from standin.cli import main


@pytest.mark.slow
def test_bench_reports_ratios_floor_and_memory(tmp_path, capsys):
    output = tmp_path / "bench.json"
    assert main(["bench", "--config", "tiny", "--steps", "2", "--rounds", "1", "--memory", "--json", str(output)]) == 0
    result = json.loads(output.read_text())["results"][0]
    assert result["video_tokens"] == 5 * 12 * 20 and result["reference_tokens"] == 36
    # Counted floor: video queries over 36 more keys, against everything else a step does.
    assert 0 < result["floor_step_overhead"] < 0.05
    for key in ("cached_step_overhead", "cached_step_vs_diffusers", "uncached_step_overhead",
                "cached_generation_overhead", "cache_mb",
                "peak_memory_base_mb", "peak_memory_cached_mb", "peak_memory_uncached_mb"):
        assert math.isfinite(result[key]), key
    assert "cached/floor" in capsys.readouterr().out
    # The overhead is over the same video work through the same kernels, and separately over diffusers' base.
    assert math.isclose(result["cached_step_overhead"], result["cached_step_s"] / result["kernels_step_s"] - 1)
    assert math.isclose(result["cached_step_vs_diffusers"], result["cached_step_s"] / result["base_step_s"] - 1)

