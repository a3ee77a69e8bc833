"""`serve --max-sessions`: sized from the free memory when not given (said at start), and
a number past what fits refused in one line before any engine is built."""

import subprocess
import sys
import time

import pytest

from personaplex_fast import server
from personaplex_fast.config import LMConfig
from personaplex_fast.errors import UserError
from personaplex_fast.loading import load_model

GIB = 2**30


def test_the_7b_on_an_h200():
    """PersonaPlex 7B on an H200 (139 GiB) after 16 GiB of bf16 weights: 123 GiB free, of
    which 2 GiB + 5% stay free. A session's bf16 cache is 2 x 32 layers x 3000 frames x
    32 heads x 128 x 2 bytes = 1.573e9 bytes, with 8-bit rows (128 bytes and a float32
    scale) 0.811e9; each adds 64 MiB of state."""
    free = 123 * GIB
    usable = free - 2 * GIB - free // 20
    bf16 = server.sessions_fit(LMConfig(), 2, None, free)
    kv8 = server.sessions_fit(LMConfig(), 2, 8, free)
    assert (bf16.per_session, kv8.per_session) == (1_572_864_000 + (64 << 20), 811_008_000 + (64 << 20))
    assert (bf16.sessions, kv8.sessions) == (75, 140) == (usable // bf16.per_session, usable // kv8.per_session)
    assert server.sessions_fit(LMConfig(), 2, None, 2 * GIB).sessions == 0


def test_slots_sized_checked_and_said(tiny, monkeypatch, capsys):
    model = load_model(tiny)
    per = server.sessions_fit(model.lm.cfg, model.lm.dtype.size, None, 0).per_session
    free = 2 * GIB + 10 * per  # less the 2 GiB and 5% kept free: room for 7 sessions
    monkeypatch.setattr("personaplex_fast.checkpoint.free_device_memory", lambda: free)
    fits = server.sessions_fit(model.lm.cfg, model.lm.dtype.size, None, free).sessions
    assert fits == 7
    assert server.engine_slots(model, None, None) == 4  # the CPU's default, less than fit
    assert f"{fits} sessions fit in 2." in capsys.readouterr().err
    assert server.engine_slots(model, fits, None) == fits
    with pytest.raises(UserError, match=rf"--max-sessions {fits + 1}: their KV caches need .* {fits} sessions fit"):
        server.engine_slots(model, fits + 1, None)
    with pytest.raises(UserError, match="needs at least 1"):
        server.engine_slots(model, 0, None)
    monkeypatch.setattr("personaplex_fast.checkpoint.free_device_memory", lambda: 2 * GIB)
    with pytest.raises(UserError, match="not one session fits"):
        server.engine_slots(model, None, None)


def test_serve_says_what_fits_and_refuses_more(tiny):
    cmd = [sys.executable, "-m", "personaplex_fast.cli", "serve", "--model", str(tiny), "--port", "0"]
    proc = subprocess.run(cmd + ["--max-sessions", "100000000"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "personaplex-fast: error: --max-sessions 100000000: their KV caches need"), proc.stderr
    started = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = started.stdout.readline()  # "serving http://127.0.0.1:PORT/ (4 sessions)"
        assert said.startswith("serving http://") and said.rstrip().endswith("(4 sessions)"), said
    finally:
        started.terminate()
        end = time.monotonic() + 30
        while started.poll() is None and time.monotonic() < end:
            time.sleep(0.1)
        started.kill()
    err = started.stderr.read()
    assert "sessions fit in" in err and "; 4 slots (the CPU default; --max-sessions to change)" in err, err
