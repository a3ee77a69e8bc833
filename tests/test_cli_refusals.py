"""Hostile files through the CLI (`offline` on a tiny checkpoint): voices, config.json,
voices.tgz and input audio. Each must end with exit status 2 and one line naming what
is wrong, no traceback, a bounded peak memory, and no file left behind (no output, and
nothing in the voice cache that did not pass every check)."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import soundfile as sf

from personaplex_fast import torchfile
from personaplex_fast.tiny import TINY
from personaplex_fast.voices import VOICE_NAMES

# A refused run peaks at what the interpreter, MLX and the tiny model take (~60 MB
# here); what the crafted files would cost unchecked is gigabytes.
PEAK_RSS_MB = 200

# The CLI under a wrapper that writes its own peak (VmHWM) at exit. ru_maxrss from
# wait4 will not do: Linux carries the parent's high-water mark across fork and exec,
# so the child "peaked" at whatever pytest had once held (411 MB on CI).
_PEAK_WRAPPER = """
import atexit, os, runpy, sys
def _peak():
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["PEAK_KB_FILE"], "w") as f:
        f.write(kb)
atexit.register(_peak)
runpy.run_module("personaplex_fast.cli", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    path = tmp_path_factory.mktemp("wav") / "q.wav"
    sf.write(str(path), 0.1 * np.sin(np.arange(24000) / 10).astype(np.float32), 24000)
    return path


def run_refused(tmp_path, model, question, *extra) -> str:
    """Runs `offline` in an empty folder with its own HOME, TMPDIR and cache; asserts
    the refusal's form and returns its line."""
    work, home, tmp, cache = (tmp_path / n for n in ("work", "home", "tmp", "cache"))
    for d in (work, home, tmp):
        d.mkdir(exist_ok=True)
    peak_file = tmp_path / "peak.kb"
    peak_file.unlink(missing_ok=True)
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "PERSONAPLEX_FAST_CACHE": str(cache),
           "PEAK_KB_FILE": str(peak_file)}
    with open(tmp_path / "out.log", "w+") as out_f, open(tmp_path / "err.log", "w+") as err_f:
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK_WRAPPER, "offline", "--model", str(model), "--input-wav",
             str(question), "--output-wav", "out.wav", "--output-text", "out.json", *extra],
            cwd=work, env=env, stdout=out_f, stderr=err_f, text=True)
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    assert proc.returncode == 2, (proc.returncode, err)
    rss_mb = int(peak_file.read_text()) / 1024
    assert "Traceback" not in err and out == "", err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("personaplex-fast: error: "), err
    assert rss_mb < PEAK_RSS_MB, f"peak memory {rss_mb:.0f} MB"
    left = [str(p.relative_to(tmp_path)) for d in (work, home, tmp) for p in d.rglob("*")]
    cached = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert left == [] and all(p.suffix in (".pt", ".wav") or p.name == ".complete" for p in cached), \
        (left, cached)
    return lines[0]


def model_with(tmp_path, tiny, config=None, archive: bytes | None = None):
    """A copy of the tiny model (links) with its config.json changed or voices.tgz replaced."""
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny.iterdir():
        os.link(f, model / f.name)
    if config is not None:
        (model / "config.json").unlink()
        (model / "config.json").write_text(json.dumps(json.loads((tiny / "config.json").read_text()) | config))
    if archive is not None:
        (model / "voices.tgz").unlink()
        (model / "voices.tgz").write_bytes(archive)
    return model


def voice_pt(path, E=5, dim=TINY.dim, ids=None):
    rng = np.random.default_rng(0)
    ring = rng.integers(0, TINY.card, (1, TINY.n_q + 1, 4)) if ids is None else ids
    torchfile.save(path, {"embeddings": rng.standard_normal((E, 1, 1, dim)).astype(np.float32), "cache": ring})
    return path


@pytest.mark.parametrize("case, error", [
    ("id 5000", "token 5000 of stream 2 is outside its table (-1..64): not a voice for this model"),
    ("16 streams", "has 16 streams, the model has 17: the voice belongs to another model"),
    ("width 64", "width 64, the model needs 128"),
    ("900 frames", "the voice has 900 frames; the limit is 750 (60 s)"),
    ("stride 0", "holds 4294967296 elements, more than the 4 of its storage"),
    ("70 s wav", "is 70.0 s long; the limit is 60 s for a voice prompt"),
])
def test_voice_files(tmp_path, tiny, question, case, error):
    path = tmp_path / "voice.pt"
    if case == "id 5000":
        ids = np.zeros((1, TINY.n_q + 1, 4), np.int64)
        ids[0, 2] = 5000
        voice_pt(path, ids=ids)
    elif case == "16 streams":
        voice_pt(path, ids=np.zeros((1, 16, 4), np.int64))
    elif case == "width 64":
        voice_pt(path, dim=64)
    elif case == "900 frames":
        voice_pt(path, E=899)
    elif case == "stride 0":
        from test_voices import _save_crafted, _View

        _save_crafted(path, {"embeddings": _View((1 << 16, 1 << 16), (0, 0)), "cache": _View((4,), (1,))})
    else:
        path = tmp_path / "voice.flac"
        with sf.SoundFile(str(path), "w", 8000, 1, subtype="PCM_S8") as f:
            f.write(np.zeros(70 * 8000, np.float32))
    line = run_refused(tmp_path, tiny, question, "--voice-prompt", str(path))
    assert error in line and str(path) in line


def _tgz(members: dict[str, bytes | int]) -> bytes:
    """A gzipped tar; an int member is that many zero bytes, streamed (a gzip bomb)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)

            class Zeros(io.RawIOBase):
                def readinto(self, b):
                    b[:] = bytes(len(b))
                    return len(b)

            tar.addfile(info, Zeros() if isinstance(data, int) else io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("case, error", [
    ("gzip bomb", "unpacks to more than 256 MB|more than 256 members or 256 MB"),
    ("unsafe member last", "refusing unsafe archive member 'voices/../../../evil.pt'"),
    ("300 members", "more than 256 members"),
])
def test_voice_archives(tmp_path, tiny, question, case, error):
    import re

    wav = (tiny / "voices.tgz").read_bytes()
    with tarfile.open(tiny / "voices.tgz") as t:
        natf0 = t.extractfile("voices/NATF0.pt").read()
    members = {"gzip bomb": {"voices/NATF0.pt": natf0, "voices/BIG.wav": 300 << 20},
               "unsafe member last": {"voices/NATF0.pt": natf0, "voices/../../../evil.pt": b"x"},
               "300 members": {f"voices/V{i}.wav": b"x" for i in range(300)}}[case]
    archive = _tgz(members)
    assert len(archive) < 2_000_000 and len(wav) > 0
    model = model_with(tmp_path, tiny, archive=archive)
    line = run_refused(tmp_path, model, question, "--voice-prompt", "NATF0")
    assert re.search(error, line) and "voices.tgz" in line
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.pt"))
    assert not list(tmp_path.parent.glob("evil.pt"))


@pytest.mark.parametrize("change, error", [
    (dict(context=10**9), "context = 1e+09 is out of range"),
    (dict(num_layers=10**6), "num_layers = 1e+06 is out of range"),
    (dict(num_layers=1000), "describes"),  # in range, but not what the weights hold
    (dict(dim="128"), 'dim must be an integer, got "128"'),
    (dict(card=-5), "card = -5 is out of range"),
    (dict(depformer_gating="gelu"), 'depformer_gating = "gelu" is not implemented'),
    (dict(depformer_pos_emb="sin"), "depformer_pos_emb = 'sin' is not implemented"),
])
def test_config_files(tmp_path, tiny, question, change, error):
    line = run_refused(tmp_path, model_with(tmp_path, tiny, config=change), question)
    assert error in line and "config.json" in line


def test_input_audio_past_the_cap_is_refused_before_decoding(tmp_path, tiny):
    """An hour of silence in 80 KB of FLAC: refused from its header."""
    path = tmp_path / "hour.flac"
    with sf.SoundFile(str(path), "w", 8000, 1, subtype="PCM_S8") as f:
        for _ in range(36):
            f.write(np.zeros(800_000, np.float32))
    assert path.stat().st_size < 200_000
    line = run_refused(tmp_path, tiny, path, "--max-input-seconds", "60")
    assert "is 3600.0 s long; the limit is 60 s (--max-input-seconds)" in line


def test_a_good_voice_archive_is_cached_once_and_whole(tmp_path, tiny, question):
    """The counterpart: the same run on the real tiny model writes its outputs and a
    cache of checked voices only."""
    cache = tmp_path / "cache"
    env = {**os.environ, "PERSONAPLEX_FAST_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "personaplex_fast.cli", "offline", "--model", str(tiny),
                           "--input-wav", str(question), "--output-wav", str(tmp_path / "o.wav"),
                           "--output-text", str(tmp_path / "o.json"), "--voice-prompt", "NATF0"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert names == sorted([".complete", "NATF0.safetensors"] + [f"{v}.{x}" for v in VOICE_NAMES for x in ("pt", "wav")])
    assert not [p for p in cache.rglob(".*") if p.name != ".complete"]  # no temporary folder left
    shutil.rmtree(cache)
