"""depformer_frame: all codebook steps of one depformer frame as one primitive.

On the CPU it chains the kernels of matvec, decoder_layers and sample_topk, so
with the same noise it must equal the model's per-op loop over those fused
primitives exactly (codes and all). Against the pure-MLX reference the logits
are compared teacher-forced (every step sees the same tokens), with the
tolerances of tests/test_decoder_layers.py; sampled codes must be exactly the
reference sampling of the primitive's own logits. The frame's caches are
NaN-filled scratch on the CPU, so a read of a slot not yet written shows.
"""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext, ops, reference
from personaplex_fast.models.lm import LM
from personaplex_fast.reference import DepformerWeights, Projection
from personaplex_fast.sampling import SamplingConfig
from personaplex_fast.tiny import TINY, random_lm_weights
from test_decoder_layers import EPS, make_projection, make_stack, np32

TOL = {mx.float32: 1e-4, mx.bfloat16: 6e-2}


def make_frame(rng, *, B=3, Q=4, C_in=128, D=64, heads=4, hidden=128, V=64, L=2, bits=0,
               dtype=mx.float32, per_step=True):
    proj = lambda n, k: make_projection(rng, n, k, bits, dtype)
    n = Q if per_step else 1
    return dict(
        h=mx.array(rng.standard_normal((B, C_in)).astype(np.float32)).astype(dtype),
        text=mx.array(rng.integers(0, 20, B).astype(np.int32)),
        weights=DepformerWeights(
            in_projs=tuple(proj(D, C_in) for _ in range(n)),
            tables=tuple(mx.array(rng.standard_normal((V + 1 if k else 21, D)).astype(np.float32)).astype(dtype)
                         for k in range(Q)),
            stacks=tuple(make_stack(rng, L, D, hidden, bits, dtype) for _ in range(n)),
            heads=tuple(proj(V, D) for _ in range(Q))),
        kw=dict(heads=heads, rope_max_period=None),
    )


def run(fn, f, forced, noise, **pick):
    return fn(f["h"], f["text"], forced, noise, f["weights"], **f["kw"], **pick)


@pytest.mark.parametrize("dtype,bits", [(mx.float32, 0), (mx.bfloat16, 0), (mx.bfloat16, 4),
                                        (mx.float32, 8)])
@pytest.mark.parametrize("per_step", [True, False])
def test_teacher_forced_logits_match_reference(dtype, bits, per_step):
    rng = np.random.default_rng(bits * 7 + per_step)
    f = make_frame(rng, bits=bits, dtype=dtype, per_step=per_step)
    Q, B = 4, 3
    forced = mx.array(rng.integers(0, 64, (Q, B)).astype(np.int32))
    assert ops.depformer_fusable(f["h"], f["weights"], f["kw"]["heads"])
    with ops.use_mode("fused"):
        codes, logits = run(ops.depformer_frame, f, forced, None, temp=0.8, top_k=10)
    ref_codes, ref_logits = run(reference.depformer_frame, f, forced, None, temp=0.8, top_k=10)
    np.testing.assert_array_equal(np.array(codes), np.array(forced))
    np.testing.assert_array_equal(np.array(ref_codes), np.array(forced))
    assert logits.shape == (Q, B, 64) and logits.dtype == dtype
    got = np32(logits)
    assert np.isfinite(got).all()
    # Quantized: MLX's CPU quantized_matmul sums in the storage type (tests/test_matvec.py).
    tol = TOL[dtype] * (4 if bits and dtype == mx.bfloat16 else 1) * (10 if bits and dtype == mx.float32 else 1)
    np.testing.assert_allclose(got, np32(ref_logits), atol=tol * max(1.0, np.abs(got).max()), rtol=0)


@pytest.mark.parametrize("greedy", [False, True])
def test_sampled_codes_are_the_reference_sampling_of_its_logits(greedy):
    rng = np.random.default_rng(11)
    f = make_frame(rng, dtype=mx.bfloat16)
    Q, B, V = 4, 3, 64
    noise = mx.random.gumbel((Q, B, V), key=mx.random.key(3))
    forced = mx.array([[-1, -1, -1], [5, -1, -1], [-1, -1, 7], [-1, -1, -1]], mx.int32)
    pick = dict(temp=0.8, top_k=10, greedy=greedy)
    with ops.use_mode("fused"):
        codes, logits = run(ops.depformer_frame, f, forced, noise, **pick)
    expect = reference.sample_topk(logits, noise, forced, **pick)
    np.testing.assert_array_equal(np.array(codes), np.array(expect))
    # Teacher-forced with its own codes, the reference sees the same tokens: same logits.
    _, ref_logits = run(reference.depformer_frame, f, codes, noise, **pick)
    np.testing.assert_allclose(np32(logits), np32(ref_logits), atol=TOL[mx.bfloat16] * 4, rtol=0)


def tiny_lm(dtype=mx.float32, bits=0):
    lm = LM(TINY)
    lm.load_weights(list(random_lm_weights(TINY, seed=2, dtype=dtype).items()))
    if bits:
        import mlx.nn as nn
        from personaplex_fast.checkpoint import quantizable
        nn.quantize(lm, group_size=64, bits=bits, class_predicate=quantizable(64))
    return lm


def frame_and_per_op_loop(dtype, bits, monkeypatch, seed, forced=None):
    """LM.depformer_frame's codes through the primitive and through the per-op loop
    over the fused ops (the primitive switched off), same inputs and key, on the
    default stream."""
    lm = tiny_lm(dtype, bits)
    assert lm.depformer_weights() is not None
    rng = np.random.default_rng(seed)
    B = 3
    h = mx.array(rng.standard_normal((B, 1, TINY.dim)).astype(np.float32)).astype(dtype)
    text = mx.array(rng.integers(0, TINY.text_card, B).astype(np.int32))
    key = mx.random.key(seed)
    with ops.use_mode("fused"):
        fused = np.array(lm.depformer_frame(h, text, SamplingConfig(), key, forced))
        monkeypatch.setattr(LM, "depformer_weights", lambda self: None)
        loop = np.array(lm.depformer_frame(h, text, SamplingConfig(), key, forced))
    return fused, loop


@pytest.mark.parametrize("dtype,bits", [(mx.float32, 0), (mx.bfloat16, 0), (mx.bfloat16, 4)])
def test_model_frame_equals_its_per_op_loop(dtype, bits, monkeypatch):
    """LM.depformer_frame through the primitive == the per-op loop over the fused ops, exactly."""
    forced = mx.full((3, TINY.dep_q), -1, mx.int32)
    forced[1, 2] = 9
    fused, loop = frame_and_per_op_loop(dtype, bits, monkeypatch, 4, forced)
    np.testing.assert_array_equal(fused, loop)
    assert fused[1, 2] == 9
    assert len(np.unique(fused)) > 4  # sampled, not a constant


# Ids a crafted voice or client could smuggle in: past the table by one, far past it
# (5000 segfaulted an unclamped lookup), the int32 extremes, and below -1.
WILD_IDS = [64, 65, 5000, 2**31 - 1, -2, -7, -(2**31)]


def test_ids_past_the_tables_are_clamped_in_every_path(monkeypatch):
    """Forced codes (the next step's embedding ids; negative ones are sampled) and
    text ids outside the tables:
    the primitive, its reference and the model's per-op loop all read the nearest
    row (id -1 a zero row), never past the table, and agree."""
    rng = np.random.default_rng(5)
    f = make_frame(rng)
    Q, B = 4, 3
    forced = mx.array(rng.choice(WILD_IDS, (Q, B)).astype(np.int32))
    f["text"] = mx.array([5000, -(2**31), 2**31 - 1], mx.int32)
    with ops.use_mode("fused"):
        codes, logits = run(ops.depformer_frame, f, forced, None, temp=0.8, top_k=10)
    _, ref_logits = run(reference.depformer_frame, f, forced, None, temp=0.8, top_k=10)
    hit = np.array(forced) >= 0  # negative: not forced, sampled
    np.testing.assert_array_equal(np.array(codes)[hit], np.array(forced)[hit])
    assert np.isfinite(np32(logits)).all()
    np.testing.assert_allclose(np32(logits), np32(ref_logits), atol=TOL[mx.float32] * 10, rtol=0)
    tables = f["weights"].tables
    clamped = [mx.minimum(forced[k], tables[k + 1].shape[0] - 1) for k in range(Q - 1)]
    f["text"] = mx.clip(f["text"], 0, tables[0].shape[0] - 1)
    _, in_range = run(reference.depformer_frame, f, mx.stack([*clamped, forced[-1]]), None, temp=0.8,
                      top_k=10)
    np.testing.assert_array_equal(np32(ref_logits), np32(in_range))

    wild = mx.array(rng.choice(WILD_IDS, (3, TINY.dep_q)).astype(np.int32))
    fused, loop = frame_and_per_op_loop(mx.float32, 0, monkeypatch, 6, wild)
    np.testing.assert_array_equal(fused, loop)


def test_temporal_embedding_clamps_ids_to_its_tables():
    lm = tiny_lm()
    ids = np.array([[[TINY.text_card + 1] + [TINY.card + 1] * TINY.n_q,
                     [5000] + [2**31 - 1] * TINY.n_q,
                     [TINY.text_card] + [TINY.card] * TINY.n_q]], np.int32)
    x = np.array(lm.embed_frame_sequence(mx.array(ids)))
    assert np.isfinite(x).all()
    np.testing.assert_array_equal(x[0, 0], x[0, 2])  # past the end reads the last row
    np.testing.assert_array_equal(x[0, 1], x[0, 2])


def test_check_mode_records_the_logit_difference():
    lm = tiny_lm(mx.bfloat16)
    h = mx.random.normal((2, 1, TINY.dim)).astype(mx.bfloat16)
    ops.reset_check_report()
    with ops.use_mode("check"):
        mx.eval(lm.depformer_frame(h, mx.array([1, 2], mx.int32), SamplingConfig(), mx.random.key(0)))
    diff = ops.check_report()["depformer_frame"]
    assert 0.0 <= diff < 0.25  # bf16 logits of size ~3, teacher-forced


def test_where_the_primitive_applies():
    """ops.depformer_fusable: tables of h's float dtype, head dims the attention kernels
    take, one bit width and one norm eps, not in reference mode."""
    f = make_frame(np.random.default_rng(1))
    h, w = f["h"], f["weights"]
    assert ops.depformer_fusable(h, w, 4) and ops.depformer_fusable(h[:, None], w, 4)
    assert not ops.depformer_fusable(h, None, 4)
    assert not ops.depformer_fusable(h, w, 8)  # heads of 8
    assert not ops.depformer_fusable(h.astype(mx.bfloat16), w, 4)  # tables float32
    q4 = Projection(*mx.quantize(w.heads[0].w, group_size=64, bits=4), bits=4)
    assert not ops.depformer_fusable(h, replace(w, heads=(q4, *w.heads[1:])), 4)
    other_eps = replace(w.stacks[1], eps=EPS / 2)
    assert not ops.depformer_fusable(h, replace(w, stacks=(w.stacks[0], other_eps, *w.stacks[2:])), 4)
    with ops.use_mode("reference"):
        assert not ops.depformer_fusable(h, w, 4)


def test_bad_operands_raise():
    rng = np.random.default_rng(0)
    f = make_frame(rng)
    w = f["weights"]
    forced = mx.full((4, 3), -1, mx.int32)

    def call(weights=w, forced=forced, noise=None):
        _ext.depformer_frame(f["h"], f["text"], forced, noise, *ops.depformer_arrays(weights), 4, 0, EPS,
                             0.0, 0.8, 10, False)

    with pytest.raises(ValueError, match="one head per codebook"):
        call(replace(w, heads=w.heads[:3]))
    with pytest.raises(ValueError, match="forced must be"):
        call(forced=mx.full((3, 4), -1, mx.int32))
    with pytest.raises(ValueError, match="noise must be"):
        call(noise=mx.zeros((4, 3, 63)))
    with pytest.raises(ValueError, match="1 or Q input projections"):
        call(replace(w, in_projs=w.in_projs[:2]))
    with pytest.raises(ValueError, match="in_proj weight must be"):
        call(replace(w, in_projs=tuple(Projection(p.w[:, :64]) for p in w.in_projs)))
    with pytest.raises(ValueError, match="layer 1: linear_out"):
        stack = w.stacks[2]
        last = replace(stack.layers[1], linear_out=Projection(stack.layers[1].linear_out.w[:, :32]))
        bad = replace(stack, layers=(stack.layers[0], last))
        call(replace(w, stacks=(*w.stacks[:2], bad, *w.stacks[3:])))


def test_the_7b_config_takes_the_primitive():
    """The real model's depformer (8 steps x 6 layers, 16 heads of 64) fits the
    primitive, dense and quantized as `convert` writes it (no weights are evaluated)."""
    import mlx.nn as nn
    from personaplex_fast.checkpoint import quantizable
    from personaplex_fast.config import LMConfig

    lm = LM(LMConfig())
    h = mx.zeros((1, 1, lm.cfg.dim), lm.dtype)
    w = lm.depformer_weights()
    assert (len(w.in_projs), len(w.tables), len(w.stacks), len(w.heads), ops.bits_of(w)) == (8, 8, 8, 8, 0)
    assert len(w.stacks[0].layers) == 6 and ops.depformer_fusable(h, w, lm.cfg.depformer.num_heads)
    nn.quantize(lm, group_size=64, bits=4, class_predicate=quantizable(64))
    w = lm.depformer_weights()
    assert ops.bits_of(w) == 4 and ops.depformer_fusable(h, w, lm.cfg.depformer.num_heads)


def test_kept_weight_lists_follow_weight_changes():
    """LM keeps the fused stacks' weight lists between steps; replacing the weights
    (load_weights, set_dtype, nn.quantize) must drop them, or a step would silently
    run on the old weights."""
    import mlx.nn as nn
    from personaplex_fast.checkpoint import quantizable

    a, b = tiny_lm(mx.float32), tiny_lm(mx.float32)
    b.load_weights(list(random_lm_weights(TINY, seed=9).items()))
    h = mx.random.normal((2, 1, TINY.dim), key=mx.random.key(1))
    text = mx.array([3, 4], mx.int32)
    greedy = SamplingConfig(greedy=True)
    before = np.array(a.depformer_frame(h, text, greedy, mx.random.key(0)))
    assert a.temporal_stack() is a.temporal_stack()  # kept
    a.load_weights(list(random_lm_weights(TINY, seed=9).items()))
    np.testing.assert_array_equal(np.array(a.depformer_frame(h, text, greedy, mx.random.key(0))),
                                  np.array(b.depformer_frame(h, text, greedy, mx.random.key(0))))
    assert not np.array_equal(before, np.array(a.depformer_frame(h, text, greedy, mx.random.key(0))))
    assert a.temporal_stack().layers[0].in_proj.w is a.transformer.layers[0].self_attn.in_projs[0].weight
    a.set_dtype(mx.bfloat16)
    assert a.depformer_weights().in_projs[0].w.dtype == mx.bfloat16
    assert a.temporal_stack().layers[0].norm1.dtype == mx.bfloat16
    nn.quantize(a, group_size=64, bits=8, class_predicate=quantizable(64))
    assert ops.bits_of(a.depformer_weights()) == 8
    # The tiny temporal FFN's 352 inputs are not a multiple of 64: its linear_out stays
    # dense, mixed bits do not fit decoder_layers, so the per-op path takes over.
    assert ops.bits_of(a.temporal_stack()) is None
    assert not ops.decoder_layers_fusable(mx.zeros((2, 1, TINY.dim), mx.bfloat16), a.temporal_stack(),
                                          TINY.num_heads)
