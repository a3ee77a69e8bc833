"""The README's test commands are what CI runs, and they bring no CUDA build of PyTorch.

(Its install and tiny-model blocks run in tests/test_install.py.)"""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_block(name: str) -> list[str]:
    out = subprocess.run([str(REPO / ".ci" / "readme-block"), name], check=True, capture_output=True, text=True)
    return out.stdout.splitlines()


def test_ci_runs_the_readme_test_block():
    run = (REPO / ".ci" / "run").read_text()
    assert 'block="$(.ci/readme-block tests)"' in run and 'eval "$block"' in run
    lines = readme_block("tests")
    assert lines[-1] == "python -m pytest -q tests"
    torch = next(i for i, line in enumerate(lines) if line.startswith("pip install") and "torch" in line)
    package = next(i for i, line in enumerate(lines) if line.startswith('pip install ".[cpu,test,cluster]"'))
    # PyTorch from its CPU index first: the package's `torch` requirement is then met.
    assert torch < package and lines[torch].endswith("--index-url https://download.pytorch.org/whl/cpu")
    apt = next(line for line in lines if "apt-get install" in line)
    for package_name in ("espeak-ng", "pulseaudio", "pulseaudio-utils", "libportaudio2", "libasound2-plugins",
                         "chromium"):
        assert f" {package_name}" in apt


def test_the_test_environment_has_no_cuda_torch(tmp_path):
    """What the README's block installed (CI's venv is made by it): a CPU PyTorch, no
    nvidia-* wheels, and installing the package with its extras again would add nothing."""
    torch = pytest.importorskip("torch")
    assert torch.version.cuda is None, torch.__version__
    names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    assert not [n for n in names if n.startswith("nvidia-")], sorted(names)
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                    f"{REPO}[cpu,test]"], check=True, capture_output=True, timeout=600)
    wanted = [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]]
    assert wanted == ["personaplex-fast"], wanted
