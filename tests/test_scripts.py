"""The console scripts of `[project.scripts]` resolve, are installed, and answer --help."""

import importlib
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_scripts_are_named_after_the_project_and_resolve():
    assert {"jax-bcd-train", "jax-bcd-report", "jax-bcd-predict",
            "jax-bcd-launch"} <= set(SCRIPTS)
    for name, target in SCRIPTS.items():
        assert name.startswith("jax-bcd-"), name
        module, attr = target.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), target


def test_installed_entry_points_match_pyproject():
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(
        group="console_scripts") if ep.name in SCRIPTS}
    assert installed == SCRIPTS, ("the installed metadata is stale: "
                                  "pip install -e . -c constraints.txt --no-deps")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_installed_script_answers_help(name):
    script = Path(sys.executable).parent / name
    if not script.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable}")
    p = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "usage" in p.stdout.lower(), p.stdout[-2000:]
