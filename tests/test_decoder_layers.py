"""decoder_layers: a stack of layers for one decode step as one primitive.

On the CPU it runs the very kernels of matvec and ring_attention, so it must equal
the chain of those two fused primitives exactly (same outputs, same caches); the
pure-MLX reference chain is compared with the tolerances of tests/test_matvec.py
(float32 1e-5; bfloat16 a few units in the last place of the hidden state, which
grows through the residual stream: 5e-2 absolute on values of size ~3).
"""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext, ops, reference
from personaplex_fast.reference import LayerStack, LayerWeights, Projection

EPS = 1e-5


def make_projection(rng, n, k, bits, dtype):
    w = mx.array((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)).astype(dtype)
    return Projection(*mx.quantize(w, group_size=64, bits=bits), bits=bits) if bits else Projection(w)


def make_stack(rng, L, C, hidden, bits, dtype):
    proj = lambda n, k: make_projection(rng, n, k, bits, dtype)
    alpha = lambda: mx.array(rng.uniform(0.5, 1.5, C).astype(np.float32)).astype(dtype)
    return LayerStack(tuple(LayerWeights(norm1=alpha(), in_proj=proj(3 * C, C), out_proj=proj(C, C),
                                         norm2=alpha(), linear_in=proj(2 * hidden, C),
                                         linear_out=proj(C, hidden))
                            for _ in range(L)), EPS)


def caches(rng, L, B, H, W, D, dtype):
    r = lambda: mx.array(rng.standard_normal((B, H, W, D)).astype(np.float32)).astype(dtype)
    return [r() for _ in range(L)], [r() for _ in range(L)]


def per_op_chain(x, pos, stack, ks, vs, heads, rope):
    """The per-op fused path: ops.matvec and ops.ring_attention, layer by layer."""
    with ops.use_mode("fused"):
        return reference_chain_with(ops, x, pos, stack, ks, vs, heads, rope)


def reference_chain_with(mod, x, pos, stack, ks, vs, heads, rope):
    B, C = x.shape
    D = C // heads
    ks2, vs2 = [], []

    def project(x, p, **epilogue):
        return mod.matvec(x, p.w, p.scales, p.biases, bits=p.bits, **epilogue)

    for layer, w in enumerate(stack.layers):
        qkv = project(x, w.in_proj, alpha=w.norm1, eps=stack.eps).reshape(B, 1, 3, heads, D)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        out, kc, vc = mod.ring_attention(q, k, v, ks[layer], vs[layer], pos, rope_max_period=rope)
        ks2.append(kc)
        vs2.append(vc)
        x1 = project(out.transpose(0, 2, 1, 3).reshape(B, C), w.out_proj, residual=x)
        h = project(x1, w.linear_in, alpha=w.norm2, eps=stack.eps, gate=True)
        x = project(h, w.linear_out, residual=x1)
    return x, ks2, vs2


def np32(a):
    return np.array(a.astype(mx.float32))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("bits", [0, 4, 8])
@pytest.mark.parametrize("B", [1, 3])
def test_equals_the_per_op_chain(dtype, bits, B):
    rng = np.random.default_rng(B * 10 + bits)
    L, C, H, hidden, W = 3, 128, 2, 96 if not bits else 128, 6
    stack = make_stack(rng, L, C, hidden, bits, dtype)
    ks, vs = caches(rng, L, B, H, W, C // H, dtype)
    x = mx.array(rng.standard_normal((B, C)).astype(np.float32)).astype(dtype)
    assert ops.decoder_layers_fusable(x, stack, H)
    for rope in (10000.0, None):
        for step, pos in enumerate([mx.array([0, 5, 13][:B]), mx.array([6, 11, 17][:B])]):
            y, k2, v2 = ops.decoder_layers(x, pos, stack, ks, vs, heads=H, rope_max_period=rope)
            y_ref, k_ref, v_ref = per_op_chain(x, pos, stack, ks, vs, H, rope)
            assert y.dtype == dtype and y.shape == (B, C)
            np.testing.assert_array_equal(np32(y), np32(y_ref))
            for a, b in zip(k2 + v2, k_ref + v_ref):
                np.testing.assert_array_equal(np32(a), np32(b))
            ks, vs, x = k2, v2, y  # chain steps: the caches carry over


TOL = {mx.float32: 1e-4, mx.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", list(TOL))
def test_matches_the_pure_mlx_reference(dtype):
    tol = TOL[dtype]
    rng = np.random.default_rng(5)
    L, B, C, H, hidden, W = 2, 2, 128, 2, 160, 4
    stack = make_stack(rng, L, C, hidden, 0, dtype)
    ks, vs = caches(rng, L, B, H, W, C // H, dtype)
    x = mx.array(rng.standard_normal((B, C)).astype(np.float32)).astype(dtype)
    pos = mx.array([3, 9])
    ops.reset_check_report()
    with ops.use_mode("check"):
        y, k2, v2 = ops.decoder_layers(x, pos, stack, ks, vs, heads=H)
    y_ref, k_ref, v_ref = reference.decoder_layers(x, pos, stack, ks, vs, heads=H)
    assert np.abs(np32(y) - np32(y_ref)).max() <= tol
    for a, b in zip(k2 + v2, k_ref + v_ref):
        assert np.abs(np32(a) - np32(b)).max() <= tol
    assert 0 <= ops.check_report()["decoder_layers"] <= tol


def test_more_than_8_sessions_where_every_projection_takes_tensor_cores(monkeypatch):
    """ops.tensor_cores_take: above MATVEC_MAX_ROWS rows the fused projections (and so
    decoder_layers) apply only on a CUDA device with 16-bit x, every K a multiple of the
    tensor-core step (C and the FFN's width) and that path not failed in the self-test;
    here the device is stood in for, the rule is what is tested."""
    rng = np.random.default_rng(9)
    C, H, hidden = 256, 2, 512
    stacks = {bits: make_stack(rng, 1, C, hidden, bits, mx.bfloat16) for bits in (0, 4)}
    failed = {}
    monkeypatch.setattr(ops, "fallbacks", lambda: failed)
    monkeypatch.setattr(ops, "_cuda_device", lambda: True)
    for rows in (9, 17, 64, 130):
        x = mx.zeros((rows, C), mx.bfloat16)
        assert all(ops.decoder_layers_fusable(x, s, H) for s in stacks.values())
        assert ops.matvec_fusable(x, stacks[0].layers[0].in_proj.w)
        assert not ops.decoder_layers_fusable(x.astype(mx.float32), make_stack(rng, 1, C, hidden, 0, mx.float32), H)
    x = mx.zeros((9, C), mx.bfloat16)
    assert not ops.decoder_layers_fusable(x, make_stack(rng, 1, C, 320, 0, mx.bfloat16), H)  # FFN K off the step
    assert not ops.decoder_layers_fusable(mx.zeros((9, 128), mx.bfloat16), make_stack(rng, 1, 128, hidden, 0,
                                                                                       mx.bfloat16), H)
    assert ops.decoder_layers_fusable(x[:8], make_stack(rng, 1, C, 320, 0, mx.bfloat16), H)  # 8: always
    failed[ops.MATVEC_TC] = "failed"
    assert not ops.decoder_layers_fusable(x, stacks[0], H) and ops.decoder_layers_fusable(x[:8], stacks[0], H)
    failed.clear()
    monkeypatch.setattr(ops, "_cuda_device", lambda: False)  # the CPU, Metal
    assert not ops.decoder_layers_fusable(x, stacks[0], H) and not ops.matvec_fusable(x, stacks[0].layers[0].in_proj.w)


def test_where_the_primitive_applies():
    """ops.decoder_layers_fusable: one decode step of at most MATVEC_MAX_ROWS sessions (here,
    on the CPU), head dims the attention kernels take, one bit width, not in reference mode; where
    it says no, ops.decoder_layers is the reference."""
    rng = np.random.default_rng(8)
    C, H = 128, 2
    stack = make_stack(rng, 2, C, 64, 0, mx.float32)
    x = mx.array(rng.standard_normal((2, C)).astype(np.float32))
    assert ops.decoder_layers_fusable(x, stack, H) and ops.decoder_layers_fusable(x[:, None], stack, H)
    rows = ops.MATVEC_MAX_ROWS + 1
    assert not ops.decoder_layers_fusable(mx.zeros((rows, C)), stack, H)
    assert not ops.decoder_layers_fusable(mx.zeros((2, 2, C)), stack, H)  # a prompt chunk
    assert not ops.decoder_layers_fusable(x, stack, 16)  # heads of 8: no attention kernel
    assert not ops.decoder_layers_fusable(x, None, H)
    with ops.use_mode("reference"):
        assert not ops.decoder_layers_fusable(x, stack, H)
    first = stack.layers[0]
    q8 = Projection(*mx.quantize(first.linear_out.w, group_size=64, bits=8), bits=8)
    mixed = replace(stack, layers=(replace(first, linear_out=q8), *stack.layers[1:]))
    assert ops.bits_of(mixed) is None and not ops.decoder_layers_fusable(x, mixed, H)
    ks, vs = caches(rng, 2, 2, H, 4, C // H, mx.float32)
    pos = mx.array([1, 6])
    got = ops.decoder_layers(x, pos, mixed, ks, vs, heads=H)
    want = reference.decoder_layers(x, pos, mixed, ks, vs, heads=H)
    for a, b in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]]):
        np.testing.assert_array_equal(np32(a), np32(b))


def test_caches_are_reused_not_copied():
    """Decoding through the stack takes the caches over in place (as ring_attention)."""
    rng = np.random.default_rng(6)
    L, B, C, H, hidden, W = 2, 2, 128, 2, 64, 8
    stack = make_stack(rng, L, C, hidden, 0, mx.float32)
    ks, vs = caches(rng, L, B, H, W, C // H, mx.float32)
    x = mx.array(rng.standard_normal((B, C)).astype(np.float32))
    mx.eval(ks, vs, ops.stack_arrays(stack))
    state = {"k": ks, "v": vs}
    del ks, vs
    copies = _ext.ring_cache_copies()
    for p in range(12):
        y, state["k"], state["v"] = ops.decoder_layers(x, mx.array([p, p + 3]), stack, state["k"],
                                                       state["v"], heads=H)
        mx.eval(y, state["k"], state["v"])
    assert _ext.ring_cache_copies() == copies


def test_bad_operands_raise():
    rng = np.random.default_rng(7)
    stack = make_stack(rng, 2, 128, 64, 0, mx.float32)
    weights = ops.stack_arrays(stack)
    ks, vs = caches(rng, 2, 1, 2, 4, 64, mx.float32)
    x = mx.zeros((1, 128))
    pos = mx.array([0])
    call = lambda **kw: _ext.decoder_layers(**{**dict(x=x, pos=pos, weights=weights, k_caches=ks,
                                                      v_caches=vs, heads=2, bits=0, eps=EPS,
                                                      rope_max_period=0.0), **kw})
    with pytest.raises(ValueError, match="weights per layer"):
        call(weights=weights[:-1])  # the last layer's linear_out missing
    first = stack.layers[0]
    narrow = replace(first, in_proj=Projection(first.in_proj.w[:, :64]))
    with pytest.raises(ValueError, match="layer 0: in_proj"):
        call(weights=ops.stack_arrays(replace(stack, layers=(narrow, *stack.layers[1:]))))
    with pytest.raises(ValueError, match="caches"):
        call(k_caches=[ks[0], ks[1][:, :1]])
    with pytest.raises(ValueError, match="pos"):
        call(pos=mx.array([0, 1]))
    with pytest.raises(ValueError, match="bits"):
        call(bits=3)
