"""Mimi in MLX: shapes, streaming == whole clip, independent batched sessions, resets,
and the strict checkpoint loader. Uses the tiny random checkpoint (frame 1920 @ 24 kHz,
8 codebooks, context 16 steps so 20 frames wrap the attention window)."""

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from personaplex_fast import ops
from personaplex_fast.config import MimiConfig
from personaplex_fast.errors import CheckpointError
from personaplex_fast.mimi_checkpoint import (CONFIG_METADATA_KEY, load_mimi, tiny_mimi_config,
                                              write_tiny_mimi)

FRAME = 1920
N_FRAMES = 20


def _clip(seed: int, frames: int = N_FRAMES) -> np.ndarray:
    """A voiced-speech-like signal: harmonics of a gliding pitch under a syllabic envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames * FRAME) / 24000
    f0 = 110 + 40 * seed + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 24000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * (3 + seed) * t)
    return (0.2 * voiced * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("mimi") / "tiny_mimi.safetensors"
    write_tiny_mimi(path, seed=0)
    return path


@pytest.fixture(scope="module")
def mimi(tiny_path):
    return load_mimi(tiny_path)


def _stream_encode(mimi, pcm, state=None):
    state = state or mimi.new_encoder_state(pcm.shape[0])
    out = []
    for i in range(pcm.shape[1] // FRAME):
        codes = mimi.encode_step(mx.array(pcm[:, i * FRAME:(i + 1) * FRAME]), state)
        mx.eval(codes, *state.arrays())
        out.append(np.array(codes))
    return np.stack(out, axis=-1)


def _stream_decode(mimi, codes, state=None):
    state = state or mimi.new_decoder_state(codes.shape[0])
    out = []
    for i in range(codes.shape[-1]):
        pcm = mimi.decode_step(mx.array(codes[..., i]), state)
        mx.eval(pcm, *state.arrays())
        out.append(np.array(pcm))
    return np.concatenate(out, axis=-1)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_config_round_trip_and_defaults(tiny_path):
    cfg = tiny_mimi_config()
    assert MimiConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert load_mimi(tiny_path).cfg == cfg
    official = MimiConfig()
    assert (official.frame_size, official.hop_length, official.resample_stride) == (1920, 960, 2)
    assert (official.quantizer.n_q, official.num_codebooks, official.transformer.context) == (32, 8, 250)


def test_shapes(mimi):
    pcm = mx.array(np.stack([_clip(0, 3), _clip(1, 3)]))
    codes = mimi.encode(pcm)
    assert codes.shape == (2, 8, 3) and codes.dtype == mx.int32
    assert mimi.encode(pcm[:, :-100]).shape == (2, 8, 3)  # tail padded to a whole frame
    assert mimi.decode(codes).shape == (2, 3 * FRAME)
    enc, dec = mimi.new_encoder_state(2), mimi.new_decoder_state(2)
    step = mimi.encode_step(pcm[:, :FRAME], enc)
    assert step.shape == (2, 8)
    assert mimi.decode_step(step, dec).shape == (2, FRAME)
    with pytest.raises(ValueError, match="1920"):
        mimi.encode_step(pcm[:, :1000], enc)


def test_streaming_equals_whole_clip(mimi):
    pcm = np.stack([_clip(0), _clip(1)])
    whole = np.array(mimi.encode(mx.array(pcm)))
    streamed = _stream_encode(mimi, pcm)
    assert len(np.unique(whole)) > 20, "codes collapsed: the tiny codec is degenerate"
    # Same arithmetic in another summation order: a near-tie could flip one code.
    assert (streamed != whole).mean() <= 0.01, (streamed != whole).sum()
    audio_whole = np.array(mimi.decode(mx.array(whole)))
    audio_streamed = _stream_decode(mimi, whole)
    assert _rel(audio_streamed, audio_whole) < 1e-5
    # Long clips go through in chunks; a chunk is a longer streaming step.
    chunked = np.array(mimi.encode(mx.array(pcm), chunk_frames=7))
    assert (chunked != whole).mean() <= 0.01
    assert _rel(np.array(mimi.decode(mx.array(whole), chunk_frames=7)), audio_whole) < 1e-5


def test_fused_codec_ops_equal_the_reference_path(mimi):
    """The fused conv / transposed conv / RVQ primitives and their pure-MLX references
    (ops modes) give the same codes and audio, up to summation order."""
    pcm = mx.array(np.stack([_clip(0, 6), _clip(1, 6)]))
    codes = np.array(mimi.encode(pcm))
    audio = np.array(mimi.decode(mx.array(codes)))
    with ops.use_mode("reference"):
        ref_codes = np.array(mimi.encode(pcm))
        ref_audio = np.array(mimi.decode(mx.array(codes)))
    assert (codes != ref_codes).mean() <= 0.01
    assert _rel(audio, ref_audio) < 1e-5
    ops.reset_check_report()
    with ops.use_mode("check"):
        mimi.decode(mimi.encode(pcm[:, :2 * FRAME]))
    report = ops.check_report()
    assert {"conv1d_stream", "conv_transpose1d_stream", "rvq_encode", "rvq_decode"} <= set(report)
    assert report["rvq_decode"] == 0 and report["conv1d_stream"] < 1e-4


def test_sessions_are_independent_and_resettable(mimi):
    clips = np.stack([_clip(0), _clip(1), _clip(2)])
    alone = [_stream_encode(mimi, clips[i:i + 1]) for i in range(3)]
    batched = _stream_encode(mimi, clips)
    for i in range(3):
        assert (batched[i:i + 1] != alone[i]).mean() <= 0.01

    # Session 1 starts a new clip mid-stream; sessions 0 and 2 carry on undisturbed.
    half = N_FRAMES // 2 * FRAME
    state = mimi.new_encoder_state(3)
    first = _stream_encode(mimi, clips[:, :half], state)
    state.reset(1)
    fresh = _clip(3)
    rest = clips[:, half:].copy()
    rest[1] = fresh[:half]
    second = _stream_encode(mimi, rest, state)
    assert (second[1] != _stream_encode(mimi, fresh[None, :half])[0]).mean() <= 0.01
    for i in (0, 2):
        joined = np.concatenate([first[i], second[i]], axis=-1)
        assert (joined != alone[i][0]).mean() <= 0.01

    # Same for the decoder, whose state is independent of the encoder's.
    codes = batched
    dec = mimi.new_decoder_state(3)
    _stream_decode(mimi, codes[..., :5], dec)
    dec.reset(1)
    audio = _stream_decode(mimi, codes[..., 5:], dec)
    assert _rel(audio[1], _stream_decode(mimi, codes[1:2, :, 5:])[0]) < 1e-5
    assert _rel(audio[0], _stream_decode(mimi, codes[0:1])[0, 5 * FRAME:]) < 1e-5
    dec.reset()
    assert _rel(_stream_decode(mimi, codes[..., :3], dec), _stream_decode(mimi, codes[..., :3])) < 1e-6


def test_bf16_runs(tiny_path):
    mimi = load_mimi(tiny_path, dtype=mx.bfloat16)
    pcm = mx.array(_clip(0, 4)[None])
    codes = mimi.encode(pcm)
    audio = mimi.decode(codes)
    assert codes.shape == (1, 8, 4) and audio.dtype == mx.float32
    assert np.isfinite(np.array(audio)).all()


def _expect_error(path, match):
    with pytest.raises(CheckpointError) as info:
        load_mimi(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and match in message, message


def test_checkpoint_errors(tiny_path, tmp_path):
    weights = load_file(str(tiny_path))
    meta = {CONFIG_METADATA_KEY: json.dumps(tiny_mimi_config().to_dict())}
    key = "decoder.model.5.convtr.convtr.weight"

    broken = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in weights.items() if k != key}, str(broken), metadata=meta)
    _expect_error(broken, f"missing key '{key}'")

    broken = tmp_path / "unexpected.safetensors"
    save_file({**weights, "encoder.model.99.conv.conv.weight": weights[key]}, str(broken), metadata=meta)
    _expect_error(broken, "unexpected key 'encoder.model.99.conv.conv.weight'")

    broken = tmp_path / "shape.safetensors"
    save_file({**weights, key: weights[key][:, :-1]}, str(broken), metadata=meta)
    _expect_error(broken, f"key '{key}' has shape")

    # Without a stored config the loader assumes the official Mimi, which this is not.
    broken = tmp_path / "noconfig.safetensors"
    save_file(weights, str(broken))
    _expect_error(broken, "has shape")

    _expect_error(tmp_path / "absent.safetensors", "cannot read")


def test_moshi_state_dict_names_are_accepted(tiny_path, tmp_path):
    """moshi's state_dict() spells attention projections in_projs.0 / out_projs.0."""
    weights = load_file(str(tiny_path))
    renamed = {k.replace("self_attn.in_proj_weight", "self_attn.in_projs.0.weight")
                .replace("self_attn.out_proj.weight", "self_attn.out_projs.0.weight"): v
               for k, v in weights.items()}
    assert renamed.keys() != weights.keys()
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(tiny_mimi_config().to_dict())})
    pcm = mx.array(_clip(0, 2)[None])
    assert (np.array(load_mimi(path).encode(pcm)) == np.array(load_mimi(tiny_path).encode(pcm))).all()


def test_compiled_layer_step_equals_uncompiled_for_every_constant():
    """The Mimi transformer's layer step is mx.compile'd with its sizes as Python
    constants: a change of heads, context, frame steps or RoPE period must retrace,
    never reuse another configuration's trace."""
    from personaplex_fast.models.mimi_layers import _compiled_layer_step, _layer_step

    rng = np.random.default_rng(0)
    r = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))
    d, f = 32, 64
    for heads, context, g, period in [(4, 16, 2, 1e4), (2, 16, 2, 1e4), (4, 12, 2, 1e4), (4, 16, 1, 1e4),
                                      (4, 16, 2, 100.0)]:
        pos = mx.array([[20, 21], [3, 4]], mx.int32)
        key_pos = mx.concatenate([mx.full((1, context), -1, mx.int32),
                                  mx.arange(20 - context, 20, dtype=mx.int32)[None]])
        args = (r(2, 2, d), pos, r(2, heads, context, d // heads), r(2, heads, context, d // heads), key_pos,
                r(d), r(d), 0.1 * r(3 * d, d), 0.1 * r(d, d), r(d), r(d), r(d), 0.1 * r(f, d), 0.1 * r(d, f), r(d))
        kw = dict(heads=heads, context=context, steps_per_frame=g, max_period=period, eps=1e-5)
        for a, b in zip(_compiled_layer_step(*args, **kw), _layer_step(*args, **kw)):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=1e-6)
