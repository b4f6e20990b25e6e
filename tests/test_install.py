"""The checkout must not shadow installed packages (issue 15).

`python -m pytest`, `python -c ...`, `python -m quantkit.cli` and `torchrun -m quantkit.cli` put the
repository root on ``sys.path``; a root folder that is a regular package is then imported instead of an
installed distribution of the same name (PyPI has `kernels`, `eval`, `recipes`, `bench`, `tests`;
transformers >= 5.25 imports `kernels`). These tests start processes from the root, as users do.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_no_root_folder_is_a_regular_package():
    """Only ``quantkit/`` may hold an ``__init__.py`` at the root: any other would shadow a PyPI
    distribution of its name for every process started in the checkout."""
    offenders = sorted(p.parent.name for p in ROOT.glob("*/__init__.py")
                       if p.parent.name != "quantkit" and not p.parent.name.startswith("."))
    offenders += sorted(p.stem for p in ROOT.glob("*.py") if p.stem not in ("setup", "conftest"))
    assert offenders == [], f"root folders/modules importable by name from the checkout: {offenders}"


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="the PyPI `kernels` is not installed")
def test_transformers_and_quantkit_import_together_from_the_root():
    r = _run_from_root("-c", "import kernels, transformers.activations, quantkit, quantkit.kernels, "
                             "quantkit.eval; print(kernels.__file__)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not r.stdout.strip().startswith(str(ROOT / "kernels")), f"`kernels` resolved into the checkout: {r.stdout}"


def test_side_folders_do_not_resolve_to_the_checkout():
    code = ("import importlib.util, sys\n"
            "for n in ('kernels', 'eval', 'recipes', 'bench', 'tests'):\n"
            "    s = importlib.util.find_spec(n)\n"
            "    print(n, s.origin if s is not None and s.origin else '-')\n")
    r = _run_from_root("-c", code)
    assert r.returncode == 0, r.stderr[-2000:]
    for line in r.stdout.splitlines():
        name, origin = line.split(" ", 1)
        assert not origin.startswith((str(ROOT / name) + os.sep, str(ROOT / name) + ".py")), \
            f"`import {name}` from the root loads {origin}"


def test_module_cli_runs_from_the_root():
    r = _run_from_root("-m", "quantkit.cli", "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "quantize" in r.stdout


def test_builtin_recipes_found():
    from quantkit.recipe import builtin_recipes

    names = builtin_recipes()
    assert "w4a16-gptq" in names and all(Path(p).is_file() for p in names.values())


def test_every_subpackage_is_in_the_wheel():
    """A non-editable install ships only pyproject's ``packages``: every folder of quantkit/ with an
    __init__.py must be listed (quantkit.moe once was not)."""
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    here = {"quantkit." + p.parent.relative_to(ROOT / "quantkit").as_posix().replace("/", ".")
            for p in (ROOT / "quantkit").rglob("__init__.py") if p.parent != ROOT / "quantkit"}
    assert here <= listed, sorted(here - listed)
    for mapped, folder in cfg["package-dir"].items():
        assert (ROOT / folder).is_dir() and mapped in listed, (mapped, folder)


def test_no_script_folder_module_is_named_after_a_dependency():
    """``python bench/X.py`` (and ``python tests/X.py``) put that folder first on ``sys.path``: a script
    there named like a package quantkit or transformers imports (``kernels``: transformers >= 5.25 imports
    the PyPI one when installed) would be imported instead of it."""
    taken = {"kernels", "transformers", "torch", "triton", "safetensors", "accelerate", "gguf", "numpy",
             "yaml", "pydantic", "tqdm", "matplotlib", "quantkit", "eval", "recipes", "datasets", "tokenizers"}
    clash = sorted(str(p.relative_to(ROOT)) for d in ("bench", "tests") for p in (ROOT / d).glob("*.py")
                   if p.stem in taken)
    assert clash == [], f"scripts that shadow a package for scripts run from their folder: {clash}"
