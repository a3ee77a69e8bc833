"""decoder_layers: a stack of layers for one decode step as one primitive.

On the CPU it runs the very kernels of matvec and ring_attention, so it must equal
the chain of those two fused primitives exactly (same outputs, same caches); the
pure-MLX reference chain is compared with the tolerances of tests/test_matvec.py
(float32 1e-5; bfloat16 a few units in the last place of the hidden state, which
grows through the residual stream: 5e-2 absolute on values of size ~3).
"""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext, ops, reference

EPS = 1e-5


def make_stack(rng, L, C, hidden, bits, dtype):
    weights = []
    for _ in range(L):
        def proj(n, k):
            w = mx.array((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)).astype(dtype)
            return list(mx.quantize(w, group_size=64, bits=bits)) if bits else [w]
        alpha = lambda: mx.array(rng.uniform(0.5, 1.5, C).astype(np.float32)).astype(dtype)
        weights += [alpha(), *proj(3 * C, C), *proj(C, C), alpha(), *proj(2 * hidden, C), *proj(C, hidden)]
    return weights


def caches(rng, L, B, H, W, D, dtype):
    r = lambda: mx.array(rng.standard_normal((B, H, W, D)).astype(np.float32)).astype(dtype)
    return [r() for _ in range(L)], [r() for _ in range(L)]


def per_op_chain(x, pos, weights, ks, vs, heads, bits, rope):
    """The per-op fused path: ops.matvec and ops.ring_attention, layer by layer."""
    with ops.use_mode("fused"):
        return reference_chain_with(ops, x, pos, weights, ks, vs, heads, bits, rope)


def reference_chain_with(mod, x, pos, weights, ks, vs, heads, bits, rope):
    B, C = x.shape
    D = C // heads
    ks2, vs2 = [], []
    for layer, (alpha1, wi, wo, alpha2, wf, wg) in enumerate(reference.layer_weights(weights, bits)):
        qkv = mod.matvec(x, *wi, bits=bits, alpha=alpha1, eps=EPS).reshape(B, 1, 3, heads, D)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        out, kc, vc = mod.ring_attention(q, k, v, ks[layer], vs[layer], pos, rope_max_period=rope)
        ks2.append(kc)
        vs2.append(vc)
        x1 = mod.matvec(out.transpose(0, 2, 1, 3).reshape(B, C), *wo, bits=bits, residual=x)
        h = mod.matvec(x1, *wf, bits=bits, alpha=alpha2, eps=EPS, gate=True)
        x = mod.matvec(h, *wg, bits=bits, residual=x1)
    return x, ks2, vs2


def np32(a):
    return np.array(a.astype(mx.float32))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("bits", [0, 4, 8])
@pytest.mark.parametrize("B", [1, 3])
def test_equals_the_per_op_chain(dtype, bits, B):
    rng = np.random.default_rng(B * 10 + bits)
    L, C, H, hidden, W = 3, 128, 2, 96 if not bits else 128, 6
    weights = make_stack(rng, L, C, hidden, bits, dtype)
    ks, vs = caches(rng, L, B, H, W, C // H, dtype)
    x = mx.array(rng.standard_normal((B, C)).astype(np.float32)).astype(dtype)
    for rope in (10000.0, None):
        for step, pos in enumerate([mx.array([0, 5, 13][:B]), mx.array([6, 11, 17][:B])]):
            y, k2, v2 = ops.decoder_layers(x, pos, weights, ks, vs, heads=H, bits=bits, eps=EPS,
                                           rope_max_period=rope)
            y_ref, k_ref, v_ref = per_op_chain(x, pos, weights, ks, vs, H, bits, rope)
            assert y.dtype == dtype and y.shape == (B, C)
            np.testing.assert_array_equal(np32(y), np32(y_ref))
            for a, b in zip(k2 + v2, k_ref + v_ref):
                np.testing.assert_array_equal(np32(a), np32(b))
            ks, vs, x = k2, v2, y  # chain steps: the caches carry over


@pytest.mark.parametrize("dtype, tol", [(mx.float32, 1e-4), (mx.bfloat16, 5e-2)])
def test_matches_the_pure_mlx_reference(dtype, tol):
    rng = np.random.default_rng(5)
    L, B, C, H, hidden, W = 2, 2, 128, 2, 160, 4
    weights = make_stack(rng, L, C, hidden, 0, dtype)
    ks, vs = caches(rng, L, B, H, W, C // H, dtype)
    x = mx.array(rng.standard_normal((B, C)).astype(np.float32)).astype(dtype)
    pos = mx.array([3, 9])
    ops.reset_check_report()
    with ops.use_mode("check"):
        y, k2, v2 = ops.decoder_layers(x, pos, weights, ks, vs, heads=H, eps=EPS)
    y_ref, k_ref, v_ref = reference.decoder_layers(x, pos, weights, ks, vs, heads=H, eps=EPS)
    assert np.abs(np32(y) - np32(y_ref)).max() <= tol
    for a, b in zip(k2 + v2, k_ref + v_ref):
        assert np.abs(np32(a) - np32(b)).max() <= tol
    assert 0 <= ops.check_report()["decoder_layers"] <= tol


def test_caches_are_reused_not_copied():
    """Decoding through the stack takes the caches over in place (as ring_attention)."""
    rng = np.random.default_rng(6)
    L, B, C, H, hidden, W = 2, 2, 128, 2, 64, 8
    weights = make_stack(rng, L, C, hidden, 0, mx.float32)
    ks, vs = caches(rng, L, B, H, W, C // H, mx.float32)
    x = mx.array(rng.standard_normal((B, C)).astype(np.float32))
    mx.eval(ks, vs, weights)
    state = {"k": ks, "v": vs}
    del ks, vs
    copies = _ext.ring_cache_copies()
    for p in range(12):
        y, state["k"], state["v"] = ops.decoder_layers(x, mx.array([p, p + 3]), weights, state["k"],
                                                       state["v"], heads=H, eps=EPS)
        mx.eval(y, state["k"], state["v"])
    assert _ext.ring_cache_copies() == copies


def test_bad_operands_raise():
    rng = np.random.default_rng(7)
    weights = make_stack(rng, 2, 128, 64, 0, mx.float32)
    ks, vs = caches(rng, 2, 1, 2, 4, 64, mx.float32)
    x = mx.zeros((1, 128))
    pos = mx.array([0])
    call = lambda **kw: _ext.decoder_layers(**{**dict(x=x, pos=pos, weights=weights, k_caches=ks,
                                                      v_caches=vs, heads=2, bits=0, eps=EPS,
                                                      rope_max_period=0.0), **kw})
    with pytest.raises(ValueError, match="weights per layer"):
        call(weights=weights[:-1])
    with pytest.raises(ValueError, match="in_proj"):
        call(weights=[weights[0], weights[1][:, :64]] + weights[2:])
    with pytest.raises(ValueError, match="caches"):
        call(k_caches=[ks[0], ks[1][:, :1]])
    with pytest.raises(ValueError, match="pos"):
        call(pos=mx.array([0, 1]))
    with pytest.raises(ValueError, match="bits"):
        call(bits=3)
