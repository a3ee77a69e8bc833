"""The command line as a new user meets it: every user error one line and exit status 2,
output paths checked before any work, defaults in --help, progress on a terminal, and
MLX without a backend named as the extra to install."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import pytest
import soundfile as sf

from personaplex_fast.cli import main


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    path = tmp_path_factory.mktemp("wav") / "question.wav"
    sf.write(str(path), 0.1 * np.sin(np.arange(2 * 24000) / 10).astype(np.float32), 24000)
    return path


def cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "personaplex_fast.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=cwd)


def in_process(capsys, *args) -> subprocess.CompletedProcess:
    """The command run by main() here (what the console script runs), for speed."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse: --help, usage errors
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    return lines[0]


@pytest.mark.parametrize("args, error", [
    (["offline", "--temp-text", "-1"], "argument --temp-text: '-1' must be a number of at least 0"),
    (["offline", "--temp-audio", "nan"], "argument --temp-audio: 'nan' must be a number of at least 0"),
    (["offline", "--topk-text", "0"], "argument --topk-text: '0' must be an integer of at least 1"),
    (["lm-run", "--model", "m", "--frames", "0"], "argument --frames: '0' must be an integer of at least 1"),
    (["lm-run", "--model", "m", "--batch", "-2"], "argument --batch: '-2' must be an integer of at least 1"),
    (["convert", "a", "b", "--q-bits", "3"], "argument --q-bits: invalid choice: 3"),
    (["offline", "--model", "m"], "the following arguments are required: --input-wav"),
    (["serve", "--model", "m", "--bogus"], "unrecognized arguments: --bogus"),
    (["nonsense"], "argument command: invalid choice: 'nonsense'"),
])
def test_usage_errors_are_one_line(capsys, args, error):
    line = one_line_error(in_process(capsys, *args))
    assert error in line and "--help" in line, line


@pytest.mark.parametrize("which", ["--output-wav", "--output-text", "a folder"])
def test_output_paths_are_checked_before_the_run(capsys, tiny, question, tmp_path, which):
    """A bad output path is refused at once: before the model loads and the audio runs,
    and with nothing written (the wav used to be written before the json failed)."""
    wav, js = tmp_path / "reply.wav", tmp_path / "reply.json"
    if which == "--output-wav":
        wav = tmp_path / "missing" / "reply.wav"
    elif which == "--output-text":
        js = tmp_path / "missing" / "reply.json"
    else:
        js = tmp_path
    t0 = time.monotonic()
    line = one_line_error(in_process(capsys, "offline", "--model", tiny, "--input-wav", question,
                                     "--output-wav", wav, "--output-text", js))
    assert ("does not exist; create it first" in line or "is a folder" in line) and str(tmp_path) in line, line
    assert not (tmp_path / "reply.wav").exists() and time.monotonic() - t0 < 20


def help_of(capsys, command: str, option: str) -> str:
    """The help entry of `option` in `command --help` (its lines up to the next option)."""
    text = in_process(capsys, command, "--help").stdout.split("\noptions:\n", 1)[1]
    entry = re.search(rf"^  {option}\b.*?(?=^  -|\Z)", text, re.M | re.S)
    assert entry, (option, text)
    return " ".join(entry.group(0).split())


@pytest.mark.parametrize("command, option, default", [
    ("offline", "--seed", "0"), ("offline", "--temp-text", "0.7"), ("offline", "--topk-text", "25"),
    ("offline", "--temp-audio", "0.8"), ("offline", "--topk-audio", "250"), ("offline", "--max-input-seconds", "3600"),
    ("lm-run", "--frames", "100"), ("lm-run", "--batch", "1"), ("lm-run", "--seed", "0"),
    ("convert", "--q-bits", "keep the checkpoint's precision"), ("convert", "--group-size", "64"),
    ("serve", "--max-sessions",
     "as many as the free memory holds, at most 64 on a GPU, 4 on the CPU; printed at start"),
    ("serve", "--port", "8998"), ("make-tiny", "--seed", "0"),
])
def test_help_shows_the_defaults(capsys, command, option, default):
    assert f"(default: {default})" in help_of(capsys, command, option)


def on_a_terminal(*args) -> str:
    """What the command shows on a terminal (a pty of 120 columns; a new one has 0)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "personaplex_fast.cli", *map(str, args)],
                            stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    text = out.decode(errors="replace")
    assert proc.wait(60) == 0, text[-2000:]
    return text


def test_progress_on_a_terminal(tiny, question, tmp_path):
    """On a terminal: bars while the weights load, the prompt runs, the frames run and a
    conversion goes; offline then tells its real-time factor. (In a pipe or a log only
    offline's frames and last line are printed.)"""
    text = on_a_terminal("offline", "--model", tiny, "--input-wav", question, "--output-wav", tmp_path / "r.wav",
                         "--output-text", tmp_path / "r.json", "--voice-prompt", "NATF2",
                         "--text-prompt", "You are a wise and friendly teacher.")
    for bar in ("load model.safetensors", "prompt", "frames"):
        assert re.search(rf"{bar}: +\d+%", text), (bar, text[-2000:])
    assert re.search(r"2\.0 s of audio in \d+\.\d s, real-time factor \d+\.\d\d", text), text[-500:]
    text = on_a_terminal("convert", tiny, tmp_path / "q8", "--q-bits", "8")
    assert re.search(r"convert: +\d+%", text) and re.search(r"load model.safetensors: +\d+%", text), text[-2000:]


def test_mlx_without_a_backend_is_one_line_naming_the_extra(tmp_path):
    """What plain `pip install .` leaves on Linux: `mlx` without `mlx-cpu`, whose first
    import fails to load libmlx.so (the fresh-install test does it for real)."""
    fake = tmp_path / "site" / "mlx"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core.py").write_text("raise ImportError('libmlx.so: cannot open shared object file: "
                                  "No such file or directory')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    line = one_line_error(cli("make-tiny", tmp_path / "tiny", env=env))
    assert "libmlx.so" in line and 'pip install ".[cpu]"' in line, line
    assert not (tmp_path / "tiny").exists()


def test_convert_checks_its_destination_first(capsys, tiny, tmp_path):
    (tmp_path / "a file").write_text("x")
    line = one_line_error(in_process(capsys, "convert", tiny, tmp_path / "a file" / "q4", "--q-bits", "4"))
    assert "is not a writable folder" in line
    line = one_line_error(in_process(capsys, "convert", tiny, tmp_path / "a file"))
    assert "destination exists and is not empty (or not a folder)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file"]
