"""Every command and code block of README.md and docs/*.md works as written (issue 13).

``python`` blocks run in a fresh folder with nothing prepared (no simulated devices: one CPU
device), the blocks of one file in order. ``bash`` blocks run in order, in one shell, in a copy of
the repository beside this checkout's ``.venv``, after the main job (the README's ``make run``:
here a shortened run of the same model, ``make run`` itself being the CI's and
`tests/test_main_job.py`'s). ``console`` blocks are cluster commands (``sbatch``, the TPU-pod
script) that cannot run here; the CPU version of ``sbatch`` runs in `tests/test_launch.py`.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
CLUSTER = ("sbatch ", "DISTRIBUTED_CPU_DEVICES_PER_TASK=", "launch/tpu_pod.sh ")
SET_UP_FREE = ["make run", "make test"]


def blocks(path: Path, lang: str) -> list[str]:
    return [body for tag, body in FENCE.findall(path.read_text()) if tag == lang]


def commands(body: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    joined = body.replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_every_fence_is_labelled_and_the_top_block_is_the_two_commands():
    for path in DOCS:
        for tag, body in FENCE.findall(path.read_text()):
            assert tag in ("", "bash", "python", "console"), (path.name, tag)
            if tag == "":  # output shown as an example, never a command to type
                first = body.strip().splitlines()[0]
                assert not first.startswith(("python", "make", "pip", "sbatch", "launch/")), (
                    path.name, first)
    top = blocks(ROOT / "README.md", "bash")[0]
    assert commands(top) == SET_UP_FREE


def test_console_blocks_hold_only_cluster_commands():
    for path in DOCS:
        for body in blocks(path, "console"):
            for cmd in commands(body):
                assert cmd.startswith(CLUSTER), (path.name, cmd)
    assert "DISTRIBUTED_CPU_DEVICES_PER_TASK" in (ROOT / "tests/test_launch.py").read_text()


def _clean_env(path_first: Path | None = None) -> dict:
    env = {"HOME": str(Path.home()), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    if path_first is not None:
        env["PATH"] = f"{path_first}:{env['PATH']}"
    return env


@pytest.mark.slow
@pytest.mark.parametrize("doc", [p.name for p in DOCS if blocks(p, "python")])
def test_python_blocks_run_as_written(doc, tmp_path):
    path = next(p for p in DOCS if p.name == doc)
    for i, body in enumerate(blocks(path, "python")):
        script = tmp_path / f"block_{i}.py"
        script.write_text(body)
        p = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=_clean_env(),
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, (doc, i, body[:200], p.stderr[-3000:])
        assert "Traceback" not in p.stderr


def _repo_copy(tmp_path: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    dest = tmp_path / "repo"
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".venv").symlink_to(sys.prefix)  # the environment running these tests
    return dest


@pytest.mark.slow
def test_bash_blocks_run_as_written(tmp_path):
    repo = _repo_copy(tmp_path)
    venv_bin = repo / ".venv" / "bin"
    script = ["set -euo pipefail",
              # the README's `make run`, shortened: the same model and flags, fewer epochs
              "python -m distributed.train --workdir=runs/default --host_devices=8 "
              "--epochs_param=2 --epochs_nonparam=2 --epochs_complete=2 --progress=log"]
    for path in DOCS:
        for j, body in enumerate(blocks(path, "bash")):
            if path.name == "README.md" and j == 0:
                continue  # the two set-up-free commands (see the first test)
            script.append(f"echo '### {path.name} block {j}' >&2")
            script.append(body)
    (repo / "docs_blocks.sh").write_text("\n".join(script) + "\n")
    p = subprocess.run(["bash", "docs_blocks.sh"], cwd=repo, env=_clean_env(venv_bin),
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-5000:]
    runs = repo / "runs"
    assert sorted((runs / "default" / "report").glob("*.png"))
    assert np.load(repo / "pred.npz")["pred"].shape[0] == 5
    for name in ("quick", "quick_again", "mine", "mine_split", "tracked", "two_hosts",
                 "ensemble", "sweep"):
        assert (runs / name / "summary.json").is_file(), name
    ensemble = np.load(repo / "ens.npz")
    assert ensemble["pred_members"].shape[0] == 4 and ensemble["pred_std"].shape == (1000, 2)
    assert "nothing to do" in p.stderr
    assert "resumed from checkpoint step 20" in p.stderr
    assert list((runs / "tracked" / "tensorboard" / "plugins" / "profile").rglob("*.xplane.pb"))
    assert (runs / "mlflow.db").is_file()
