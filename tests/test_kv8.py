"""The 8-bit KV cache (Engine(kv_bits=8), --kv-bits 8): int8 codes and a float32 scale per
(session, head, position) row, in the pure-MLX reference (reference.quantize_rows and
reference.ring_attention over (codes, scales) rings), the tick program's CPU path, the
engine on both of its paths, and the CLI end to end.

Its kernels run in the emulator (tests/test_tick_emulator.py), its accuracy against the
model's own cache in tests/test_lm_parity.py. Tolerances: out as tests/test_ring_attention.py
(the old rows come dequantized from the same codes on both sides, the new ones unquantized);
rings: scales to 1e-5 relative, codes equal but where the quantized value differed in its
last float32 bits (a RoPE angle through std::cos against MLX's cos, a sum in another order)
and crossed a rounding midpoint: one step, in at most 1% of the codes.
"""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from personaplex_fast import ops, reference, tick
from personaplex_fast.cli import build_parser
from personaplex_fast.engine import Engine
from personaplex_fast.loading import load_model
from personaplex_fast.models.cache import RingKVCache
from personaplex_fast.sampling import SamplingConfig
from test_ring_attention import assert_close
from test_tick import converse_alike
from test_tick_emulator import program_op

GREEDY = SamplingConfig(greedy=True)


def test_quantize_rows_is_absmax_over_127_rounded_to_even():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 32)).astype(np.float32) * rng.uniform(0.01, 10, (3, 5, 1)).astype(np.float32)
    x[0, 0] = 0.0  # a zero row: scale 0, codes 0
    x[0, 1, :4] = [127.0, 0.5, 1.5, -2.5]  # scale 1: ties go to the even code
    x[0, 1, 4:] = 0.25
    codes, scales = reference.quantize_rows(mx.array(x))
    assert codes.dtype == mx.int8 and scales.dtype == mx.float32 and scales.shape == (3, 5)
    want_scales = np.abs(x).max(-1) / np.float32(127)
    np.testing.assert_array_equal(np.array(scales), want_scales)
    s = np.where(want_scales > 0, want_scales, 1)[..., None]
    np.testing.assert_array_equal(np.array(codes), np.clip(np.rint(x / s), -127, 127).astype(np.int8))
    np.testing.assert_array_equal(np.array(codes)[0, 1, :4], [127, 0, 2, -2])
    assert (np.array(codes)[0, 0] == 0).all()
    back = np.array(reference.dequantize_rows(codes, scales))
    assert (np.abs(back - x) <= want_scales[..., None] / 2 * (1 + 1e-6)).all()


def as_codes(ring):
    return np.array(ring[0]).astype(np.int32), np.array(ring[1])


SCALE_RTOL, CODE_FLIPS = 1e-5, 0.01  # the rings' tolerances (the module's docstring)


def assert_ring_close(got, want, what):
    """Codes (and scales) equal but for a rare one-step flip (see the module's docstring)."""
    (gc, gs), (wc, ws) = as_codes(got), as_codes(want)
    np.testing.assert_allclose(gs, ws, rtol=SCALE_RTOL, atol=0, err_msg=f"{what}: scales")
    diff = np.abs(gc - wc)
    assert diff.max() <= 1 and diff.mean() <= CODE_FLIPS, f"{what}: codes differ at {int((diff > 0).sum())} places"


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("T", [1, 4, 12])  # 12 > W: only the last W new rows enter the ring
@pytest.mark.parametrize("rope", [10000.0, None])
def test_program_attention_matches_reference(dtype, T, rope):
    """The tick program's attention op over an 8-bit ring (its CPU path) against
    reference.ring_attention over the same (codes, scales): fresh, mid-ring and wrapped
    sessions."""
    rng = np.random.default_rng(T)
    B, H, D, W = 3, 2, 16, 9
    q, k, v = (mx.array(rng.standard_normal((B, H, T, D)).astype(np.float32)).astype(dtype) for _ in range(3))
    kc, vc = (reference.quantize_rows(mx.array(rng.standard_normal((B, H, W, D)).astype(np.float32)).astype(dtype))
              for _ in range(2))
    pos = mx.array(np.array([0, 8, 30], np.int32))
    got = program_op({"q": q, "k": k, "v": v, "pos": pos},
                     {"kc": kc[0], "vc": vc[0], "ks": kc[1], "vs": vc[1], "out": ((B, H, T, D), dtype)},
                     lambda p, h: p.attention(q=h["q"], k=h["k"], v=h["v"], k_cache=h["kc"], v_cache=h["vc"],
                                              pos=h["pos"], out=h["out"], B=B, H=H, T=T, D=D, W=W,
                                              new_strides=[H * T * D, T * D, D], rope_max_period=rope or 0.0,
                                              k_scales=h["ks"], v_scales=h["vs"]))
    out, k_ring, v_ring = reference.ring_attention(q, k, v, kc, vc, pos, rope_max_period=rope)
    assert_close(got["out"], out, dtype, "out", 30 + T if rope else 0)
    assert_ring_close((got["kc"], got["ks"]), k_ring, "k ring")
    assert_ring_close((got["vc"], got["vs"]), v_ring, "v ring")


def test_reference_8bit_ring_streams_like_dequantized_attention():
    """reference.ring_attention over an 8-bit ring, stepped past the wrap, equals attention
    over what the ring holds: older keys and values as code * scale, the new ones as given."""
    rng = np.random.default_rng(3)
    B, H, D, W = 2, 2, 8, 5
    ring = RingKVCache(1, B, H, W, D, mx.float32, bits=8)
    plain = RingKVCache(1, B, H, W, D, mx.float32)
    for p in range(2 * W + 2):
        q, k, v = (mx.array(rng.standard_normal((B, H, 1, D)).astype(np.float32)) for _ in range(3))
        pos = mx.array([p, p + 3])
        # The plain ring holds exactly what the 8-bit one dequantizes to.
        plain.keys[0] = reference.dequantize_rows(*ring.keys[0])
        plain.values[0] = reference.dequantize_rows(*ring.values[0])
        want = plain.attend(0, q, k, v, pos, 10000.0)
        got = ring.attend(0, q, k, v, pos, 10000.0)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-6, err_msg=f"step {p}")
        np.testing.assert_allclose(np.array(reference.dequantize_rows(*ring.keys[0])), np.array(plain.keys[0]),
                                   atol=np.array(ring.keys[0][1]).max() / 2 * 1.001, err_msg=f"step {p}")


def test_fused_primitives_take_the_reference_over_an_8bit_ring():
    """ops' rule: ring_attention and decoder_layers attend over caches in the activations'
    dtype only; an 8-bit ring runs the reference (check mode records nothing for it)."""
    from personaplex_fast.config import LMConfig
    from personaplex_fast.models.lm import LM

    cfg = LMConfig(dim=64, num_heads=4, num_layers=2, context=8, text_card=30, card=16)
    lm = LM(cfg)
    state = lm.new_state(2, kv_bits=8)
    x = mx.zeros((2, 1, cfg.dim))
    assert not ops.cache_fusable(state.kv.keys[0]) and ops.cache_fusable(lm.new_state(2).kv.keys[0])
    stack = lm.temporal_stack()
    assert ops.decoder_layers_fusable(x, stack, cfg.num_heads, lm.new_state(2).kv.keys[0])
    assert not ops.decoder_layers_fusable(x, stack, cfg.num_heads, state.kv.keys[0])
    ops.reset_check_report()
    with ops.use_mode("check"):
        h, _ = lm.temporal(x, state)
        mx.eval(h, *state.kv.arrays())
    assert "ring_attention" not in ops.check_report() and "decoder_layers" not in ops.check_report()
    assert all(isinstance(r, tuple) and r[0].dtype == mx.int8 for r in state.kv.keys)


def test_cache_halves_the_bytes_and_loads_a_bf16_row(tiny):
    lm = load_model(tiny, dtype=mx.bfloat16).lm
    cfg = lm.cfg
    full, half = lm.new_state(3).kv, lm.new_state(3, kv_bits=8).kv
    assert full.nbytes == cfg.kv_bytes(3, 2) and half.nbytes == cfg.kv_bytes(3, 2, kv_bits=8)
    assert half.nbytes == full.nbytes * (cfg.head_dim + 4) // (2 * cfg.head_dim)
    # A prompt's cache is the model's dtype; loaded into an 8-bit one, its rows are quantized.
    src = lm.new_state(1).kv
    src.keys = [mx.array(np.random.default_rng(i).standard_normal(a.shape).astype(np.float32)).astype(mx.bfloat16)
                for i, a in enumerate(src.keys)]
    half.load(2, *src.rows(0, 8))
    for ring, row in zip(half.keys, src.keys):
        codes, scales = reference.quantize_rows(row[0])
        np.testing.assert_array_equal(np.array(ring[0][2]), np.array(codes))
        np.testing.assert_array_equal(np.array(ring[1][2]), np.array(scales))
        assert (np.array(ring[0][:2]) == 0).all()
    with pytest.raises(ValueError, match="cannot be loaded"):
        half.rows(0, None)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["f32", "bf16"])
def test_program_equals_per_op_engine_with_8bit_cache(tiny, dtype):
    """Engine(kv_bits=8) as the tick program and op by op (its attention the pure-MLX
    reference): test_tick's conversation, its prompt prefilled in the model's dtype
    (quantized as it is loaded)."""
    model = load_model(tiny, dtype=dtype)
    prompt = model.prompt(voice="NATF0", text="You like to talk.", seed=1, sampling=GREEDY)
    prog = Engine(model.lm, model.mimi, slots=3, sampling=GREEDY, kv_bits=8)
    per_op = Engine(model.lm, model.mimi, slots=3, sampling=GREEDY, program=False, kv_bits=8)
    assert prog.program is not None and prog.program.lm.kv_bits == 8
    assert per_op.lm_state.kv.bits == 8
    converse_alike(prog, per_op, prompt)
    # Both hold the same 8-bit rings (the prompted session's quantized as it was loaded).
    for kind, got, want in zip(("keys", "values"), prog.program.read_kv(), (per_op.lm_state.kv.keys,
                                                                           per_op.lm_state.kv.values)):
        for layer, (g, w) in enumerate(zip(got, want)):
            assert_ring_close(g, w, f"{kind} of layer {layer}")


def offline(tiny, wav, out, *extra):
    return subprocess.run(
        [sys.executable, "-m", "personaplex_fast.cli", "offline", "--model", str(tiny), "--input-wav", str(wav),
         "--output-wav", str(out / "o.wav"), "--output-text", str(out / "o.json"), "--greedy", "--seed", "2",
         "--voice-prompt", "NATF0", "--text-prompt", "You enjoy a good conversation.", "--kv-bits", "8", *extra],
        capture_output=True, text=True, timeout=600)


def test_offline_with_8bit_cache_program_equals_reference(tiny, tmp_path):
    """`offline --kv-bits 8` as users run it (the tick program) and with --reference (pure
    MLX, op by op): the same transcript, the same audio to float32 rounding; --check runs too."""
    wav = tmp_path / "in.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "Hello, I would like to book a table for two people tonight."],
                   check=True)
    runs = {}
    for name, extra in (("program", ()), ("reference", ("--reference",)), ("check", ("--check",))):
        out = tmp_path / name
        out.mkdir()
        proc = offline(tiny, wav, out, *extra)
        assert proc.returncode == 0, proc.stderr
        runs[name] = ([t["token"] for t in json.loads((out / "o.json").read_text())["tokens"]],
                      sf.read(out / "o.wav")[0], proc.stdout)
    (tp, ap, _), (tr, ar, _) = runs["program"], runs["reference"]
    assert len(tp) > 10 and tp == tr
    np.testing.assert_allclose(ap, ar, rtol=0, atol=1e-4)
    assert np.abs(ap).max() > 1e-3
    checked = [line for line in runs["check"][2].splitlines() if line.startswith("check:")]
    assert any("depformer_frame" in line for line in checked) and any("matvec" in line for line in checked)
    for line in checked:
        assert float(line.rsplit("=", 1)[1]) < 1e-3, line


def test_kv_bits_flag_reaches_every_command(tiny, capsys):
    """--kv-bits for offline, chat, serve and lm-run (lm-run run for a few frames)."""
    p = build_parser()
    for cmd in (["offline", "--input-wav", "a", "--output-wav", "b", "--output-text", "c"], ["chat"], ["serve"]):
        assert p.parse_args([cmd[0], "--model", "m", *cmd[1:], "--kv-bits", "8"]).kv_bits == 8
        assert p.parse_args([cmd[0], "--model", "m", *cmd[1:]]).kv_bits is None
    with pytest.raises(SystemExit):
        p.parse_args(["chat", "--model", "m", "--kv-bits", "4"])
    from personaplex_fast.cli import main

    assert main(["lm-run", "--model", str(tiny), "--frames", "4", "--kv-bits", "8"]) == 0
    assert "4 frames" in capsys.readouterr().out


def test_engine_rejects_other_kv_bits(tiny):
    model = load_model(tiny)
    with pytest.raises(ValueError, match="kv_bits"):
        Engine(model.lm, model.mimi, kv_bits=4)
    assert tick.TickRunner(model.lm, model.mimi, 1, GREEDY, gpu=False, kv_bits=8).program.arena_bytes < \
        tick.TickRunner(model.lm, model.mimi, 1, GREEDY, gpu=False).program.arena_bytes
