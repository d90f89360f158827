"""Issue 17, generation size guard (standin.pipeline.check_memory): sizes beyond the base's RoPE table, or needing
more memory than there is, are refused from the shapes alone, in one line, before anything is allocated."""

import importlib.util
import json
import subprocess
import sys
from collections import namedtuple

import psutil
import pytest

from standin.cli import main
from standin.pipeline import check_memory
from standin.tiny import tiny_pipeline

GIB = 2**30
Memory = namedtuple("Memory", "available")


def with_available(monkeypatch, available: int) -> None:
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(available))


def needed_gib(pipe, height, width, frames, monkeypatch, part="needs about ") -> float:
    """The estimate (or one `part` of it), read from the refusal when nothing is available."""
    with_available(monkeypatch, 0)
    with pytest.raises(ValueError) as error:
        check_memory(pipe, height, width, frames)
    return float(str(error.value).split(part)[1].split(" GiB")[0])


def test_the_estimate_refuses_what_does_not_fit_with_the_numbers(monkeypatch):
    pipe = tiny_pipeline()
    with_available(monkeypatch, 64 * GIB)
    check_memory(pipe, 512, 512, 33)
    with_available(monkeypatch, GIB // 2)
    with pytest.raises(ValueError, match=r"512x512 with 33 frames needs about \d+\.\d\d GiB at its peak on cpu "
                                         r"\(transformer .* GiB for 9216 tokens, VAE decode .* GiB\), "
                                         r"0\.50 GiB available"):
        check_memory(pipe, 512, 512, 33)
    # it grows with the video: more frames, larger frames
    assert needed_gib(pipe, 512, 512, 65, monkeypatch) > needed_gib(pipe, 512, 512, 33, monkeypatch)
    assert needed_gib(pipe, 1024, 512, 33, monkeypatch) > needed_gib(pipe, 512, 512, 33, monkeypatch)


@pytest.fixture
def restore_active_attention_backend():
    """set_attention_backend also sets diffusers' process-wide active backend: later tests must not inherit it."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


def test_materialised_attention_scores_are_counted(monkeypatch, restore_active_attention_backend):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    pipe, other = tiny_pipeline(), tiny_pipeline()
    flash = needed_gib(pipe, 512, 512, 33, monkeypatch, part="(transformer ")
    pipe.transformer.set_attention_backend("_native_math")  # materialises batch x heads x N x (N + R) floats
    tokens = 9 * 32 * 32
    scores = 2 * tokens * (tokens + 4) * 4 / GIB  # tiny: 2 heads, 2x2 reference tokens, batch 1
    assert needed_gib(pipe, 512, 512, 33, monkeypatch, part="(transformer ") == pytest.approx(flash + scores, abs=0.01)
    # a model whose processors name no backend runs the process-wide active one, which that call set too
    assert needed_gib(other, 512, 512, 33, monkeypatch, part="(transformer ") == pytest.approx(flash + scores,
                                                                                               abs=0.01)
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    assert needed_gib(other, 512, 512, 33, monkeypatch, part="(transformer ") == pytest.approx(flash, abs=0.01)


def test_sizes_beyond_the_rope_table_are_refused_with_the_limit():
    pipe = tiny_pipeline()
    limit = pipe.transformer.config.rope_max_seq_len
    with pytest.raises(ValueError, match=rf"RoPE table of {limit} positions per axis .* at most {limit * 16} pixels"):
        pipe.check_sizes(100000, 100000, 5)
    frames = (limit + 1 - 1) * pipe.vae_scale_factor_temporal + 1
    with pytest.raises(ValueError, match="beyond this base's RoPE table"):
        pipe.check_sizes(32, 32, frames + pipe.vae_scale_factor_temporal)


# ---- the mini model, as `standin generate` runs it ---------------------------------------------------------------

requires_mini = pytest.mark.skipif(importlib.util.find_spec("standin_mini") is None,
                                   reason="the mini model (pip install -e ./mini)")


@pytest.fixture(scope="module")
def mini_pipe():
    import torch

    from standin.commands import default_model
    from standin.loading import load_pipeline

    model = default_model()
    return load_pipeline(model["base"], model["adapter"], device="cpu", dtype=torch.float32)


@requires_mini
def test_the_readme_command_passes_and_the_reported_cases_are_refused(mini_pipe):
    config = mini_pipe.config
    mini_pipe.check_sizes(config.default_height, config.default_width, config.default_num_frames)  # 64x64, 17
    with pytest.raises(ValueError, match="RoPE table of 1024 positions per axis"):
        mini_pipe.check_sizes(100000, 100000, 17)
    with pytest.raises(ValueError, match="1500 frames is a token grid of 1500 x 4 x 4 .* at most 16384 pixels on a "
                                         "side and 1024 frames"):
        mini_pipe.check_sizes(64, 64, 1500)


@requires_mini
@pytest.mark.parametrize("extra, message", [
    (["--height", "100000", "--width", "100000"], "RoPE table of 1024 positions"),
    (["--frames", "1500"], "RoPE table of 1024 positions"),
])
def test_cli_refuses_in_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    output = tmp_path / "out.mp4"
    code = main(["generate", "--reference", str(_example()), "--prompt",
                 "A woman waves on a beach at noon.", "-o", str(output), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: ") and message in err[-1]
    assert list(tmp_path.iterdir()) == []


def _example():
    from conftest import REPO

    return REPO / "examples" / "woman_34.png"


GUARD = """
import json, resource, sys, time
import psutil, torch
from standin.commands import default_model
from standin.loading import load_pipeline

real = psutil.virtual_memory
class Capped:  # the refusal must not depend on this machine: at most 64 GiB available (the estimate is ~80)
    available = min(real().available, 64 * 2**30)
psutil.virtual_memory = lambda: Capped
model = default_model()
pipe = load_pipeline(model["base"], model["adapter"], device="cpu", dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
try:
    pipe(prompt="A woman waves on a beach at noon.", reference_image=sys.argv[1], height=4096, width=4096)
    error = None
except ValueError as refusal:
    error = str(refusal)
print(json.dumps({"seconds": time.perf_counter() - started, "error": error,
                  "grew_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


@requires_mini
def test_4096x4096_on_the_mini_model_is_refused_quickly_without_allocating():
    result = subprocess.run([sys.executable, "-c", GUARD, str(_example())], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["error"] is not None and "4096x4096 with 17 frames needs about" in measured["error"]
    assert "GiB available" in measured["error"]
    assert measured["seconds"] < 2
    assert measured["grew_mib"] < 100
