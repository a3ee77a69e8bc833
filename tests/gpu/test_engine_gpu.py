"""The engine on the GPU: the tiny model in the official format, streamed frame by
frame with every op fused (the default), with the pure-MLX references
(--reference) and in check mode (--check), in process and through the CLI.

Check mode runs fused and reference ops on the same inputs. Both run on the GPU
here, where MLX's float32 matmul rounds like TF32 (~1e-3 relative), so the
largest per-op difference allowed is 2e-2 (on the CPU, tests/test_offline.py
allows 1e-3).
"""

import subprocess
import sys
import wave

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import ops
from personaplex_fast.loading import load_model
from personaplex_fast.sampling import SamplingConfig

CHECK_TOL = 2e-2


def user_audio(frames, slots, frame_size, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(frames * frame_size) / 24000
    voice = 0.3 * np.sin(2 * np.pi * (180 + 40 * np.sin(3 * t)) * t)
    return [(voice[i * frame_size:(i + 1) * frame_size] + 0.01 * rng.standard_normal((slots, frame_size)))
            .astype(np.float32) for i in range(frames)]


def run_engine(model, mode, frames=16, slots=2):
    with ops.use_mode(mode):
        engine = model.engine(slots=slots, sampling=SamplingConfig(greedy=True))
        for _ in range(slots):
            engine.join()
        outs = [engine.tick(pcm) for pcm in user_audio(frames, slots, engine.frame_size)]
    return np.stack([o.pcm for o in outs]), np.stack([o.text for o in outs])


@pytest.mark.parametrize("mode", ["fused", "reference", "check"])
def test_engine_modes_on_gpu(tiny, mode):
    assert mx.default_device() == mx.gpu
    model = load_model(tiny)
    ops.reset_check_report()
    audio, text = run_engine(model, mode)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0
    assert audio.shape[-1] == 1920 and text.shape == (16, 2)
    if mode == "check":
        report = ops.check_report()
        for name in ("matvec", "decoder_layers", "conv1d_stream", "conv_transpose1d_stream", "rvq_decode"):
            assert name in report, f"{name} never ran in check mode: {sorted(report)}"
        for name, diff in report.items():
            if name != "rvq_encode":  # code indices: a near-tie may flip, see ops.rvq_encode
                assert diff <= CHECK_TOL, (name, diff)


def test_cli_check_on_gpu(tiny, tmp_path):
    pytest.importorskip("soundfile")
    pytest.importorskip("soxr")
    wav = tmp_path / "in.wav"
    pcm = np.concatenate([f[0] for f in user_audio(25, 1, 1920)])
    with wave.open(str(wav), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(24000)
        f.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    for extra in (["--check"], ["--reference"], []):
        proc = subprocess.run(
            [sys.executable, "-m", "personaplex_fast.cli", "offline", "--model", str(tiny),
             "--input-wav", str(wav), "--output-wav", str(tmp_path / "o.wav"),
             "--output-text", str(tmp_path / "o.json"), "--greedy", *extra],
            capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        checks = [l for l in proc.stdout.splitlines() if l.startswith("check:")]
        assert bool(checks) == (extra == ["--check"])
        for line in checks:
            if "rvq_encode" not in line:
                assert float(line.rsplit("=", 1)[1]) <= CHECK_TOL, line
