"""The README followed literally on a fresh Linux machine (CPU): its install block in a copy
of the checkout (the files git would clone, no build output) makes a venv and builds the
package; its tiny block writes question.wav, a tiny checkpoint and runs `offline` with a
packaged voice and a role prompt. Then what a plain `pip install .` leaves (MLX without its
CPU backend) must stop every command with one line naming the extra.

It builds the C++ extension from source (a few minutes on 2 cores) and takes its Python
packages from pip's cache or index as a user's pip would.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import soundfile as sf

REPO = Path(__file__).resolve().parents[1]


def readme_block(name: str) -> str:
    return subprocess.run([str(REPO / ".ci" / "readme-block"), name], check=True, capture_output=True,
                          text=True).stdout


def fresh_checkout(dest: Path) -> Path:
    """The working tree's files that a clone has (tracked, and new files not ignored)."""
    if (REPO / ".git").exists() and shutil.which("git"):
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                               capture_output=True).stdout.decode().split("\0")
    else:  # an unpacked tarball: everything but what builds and tests leave
        skip = {"build", ".venv", ".ci-venv", "__pycache__", ".pytest_cache", ".benchmarks"}
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and p.suffix != ".so"
                 and not skip & set(p.relative_to(REPO).parts)]
    for name in filter(None, names):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def user_env(home: Path) -> dict:
    """A shell as a user has it: no venv active, nothing of this test run on the paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin)
    env["PERSONAPLEX_FAST_CACHE"] = str(home / "cache")
    return env


def test_the_readme_install_and_tiny_example(tmp_path):
    checkout = fresh_checkout(tmp_path / "personaplex_fast")
    script = "\n".join(["set -euo pipefail", readme_block("install"), readme_block("tiny"),
                        # What a plain `pip install .` leaves on Linux: mlx without its backend.
                        "pip uninstall -q -y mlx-cpu",
                        "personaplex-fast make-tiny tiny2 2> plain.err && exit 3 || echo \"exit $?\" > plain.rc"])
    proc = subprocess.run(["bash", "-c", script], cwd=checkout, env=user_env(tmp_path), capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    # The example's outputs: the reply has the question's duration; its transcript and speed were told.
    question, reply = sf.info(str(checkout / "question.wav")), sf.info(str(checkout / "reply.wav"))
    assert reply.samplerate == 24000 and reply.frames == round(question.frames * 24000 / question.samplerate)
    assert (checkout / "reply.json").stat().st_size > 0
    assert "wrote reply.wav and reply.json" in proc.stdout and "real-time factor" in proc.stdout, proc.stdout
    assert (checkout / ".venv" / "bin" / "personaplex-fast").exists()
    # Without the backend: one line, exit status 2, the extra named.
    assert (checkout / "plain.rc").read_text().strip() == "exit 2"
    err = (checkout / "plain.err").read_text().strip().splitlines()
    assert len(err) == 1 and 'pip install ".[cpu]"' in err[0] and "libmlx" in err[0], err
