"""The product stands alone: it imports no extra package (the mini world is found only through entry points),
builds its command line without torch, and says what to install when an entry point it needs is missing."""

import json
import subprocess
import sys

import pytest

from standin import plugins
from standin.cli import build_parser, main

HEAVY = ("torch", "diffusers", "transformers", "cv2", "dlib", "onnxruntime")


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_every_product_module_imports_without_the_mini_package():
    """standin_mini made unimportable: every standin.* module still imports, and none tried to import it."""
    out = run_python("""
import importlib, json, pkgutil, sys
sys.modules["standin_mini"] = None  # `import standin_mini` now raises ImportError
import standin
names = sorted(m.name for m in pkgutil.walk_packages(standin.__path__, "standin."))
for name in names:
    importlib.import_module(name)
print(json.dumps(names))
""")
    names = json.loads(out)
    assert {"standin.cli", "standin.commands", "standin.train.trainer", "standin.faces", "standin.plugins"} <= set(names)
    assert not any(name.startswith("standin.mini") for name in names)
    # nor inside a function, where importing the module would not reach it
    import re
    from pathlib import Path

    import standin

    for source in Path(standin.__file__).parent.rglob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+standin_mini", source.read_text(), re.M), source


def test_building_the_command_line_imports_nothing_heavy():
    """What `standin --help` (and every argument error) costs: no torch, diffusers, cv2, dlib; installed command
    packages (standin mini) included."""
    out = run_python(f"""
import json, sys
from standin.cli import build_parser
build_parser().format_help()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {list(HEAVY)!r})))
""")
    assert json.loads(out) == []


def test_top_level_help_is_user_text(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "one photo of a person and a prompt in" in out and "subcommand per module" not in out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()]
    # one line per command
    for command in ("generate", "convert", "bench", "preprocess", "eval", "prepare-data", "train"):
        assert listed.count(command) == 1


@pytest.fixture
def nothing_installed(monkeypatch, tmp_path):
    """As if no package registered any standin entry point (standin-mini not installed); run away from the
    repository root, whose folder mini/ would be taken for a face model folder named mini."""
    from standin.faces import _cached_backend

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [])
    _cached_backend.cache_clear()
    yield
    _cached_backend.cache_clear()


def test_without_a_default_model_generate_says_what_to_install(nothing_installed, tmp_path, capsys):
    assert main(["generate", "--prompt", "x", "-o", str(tmp_path / "out" / "o.mp4")]) == 1
    assert capsys.readouterr().err == ("error: no --base given and no default model is installed (pip install -e "
                                       "mini/ for the embedded mini model)\n")
    assert not (tmp_path / "out").exists()


def test_without_the_mini_package_its_names_are_unknown(nothing_installed):
    from standin.faces import get_backend
    from standin.train.data import is_named_dataset, named_dataset

    with pytest.raises(ValueError, match=r"unknown face backend 'mini': use one of the installed names \['dlib', "
                                         r"'dlib-hog', 'dlib-cnn'\]"):
        get_backend("mini")
    assert not is_named_dataset("mini")
    with pytest.raises(ValueError, match="no dataset named 'mini' is installed"):
        named_dataset("mini", "train", 4, None, None, None, 64)
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert "mini" not in commands and "generate" in commands


def test_bench_command_names_match_the_benchmark():
    from standin import bench, bench_cli

    assert set(bench_cli.CONFIG_NAMES) == set(bench.CONFIGS) and set(bench_cli.DTYPE_NAMES) == set(bench.DTYPES)
