"""selftest: every fused primitive passes its self-test on the CPU at the tiny model's
shapes (what CI can run; `personaplex-fast selftest` on the GPUs is run by hand), with the
tests' own tolerances; under "auto" kernels a primitive whose check fails (forced here) or
whose kernels do not build falls back to its reference with one warning naming it, the
verdict cached per device; "fused" kernels ignore it. Here the CPU stands in for a GPU
(ops.validates_here), at the tiny shapes. About 3 s.
"""

import warnings

import mlx.core as mx
import numpy as np
import pytest
import test_conv1d_stream
import test_conv_transpose1d_stream
import test_decoder_layers
import test_depformer_frame
import test_matvec
import test_ring_attention

from personaplex_fast import _ext, ops, reference, selftest
from personaplex_fast.cli import main


def test_every_primitive_passes_at_the_tiny_shapes_on_the_cpu(capsys):
    main(["selftest", "--tiny", "--batch", "2"])  # raises SystemExit(1) on a failure
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.split()[:1] and line.split()[0] in selftest.PRIMITIVES]
    assert [r.split()[0] for r in rows] == list(selftest.PRIMITIVES), out
    assert all(r.endswith("  ok") and int(r.split()[1]) > 0 for r in rows), out


def test_the_tolerances_are_the_tests():
    assert selftest.RING_TOL == test_ring_attention.TOL
    assert selftest.MATVEC_REL == test_matvec.REL
    assert selftest.LAYERS_TOL == test_decoder_layers.TOL
    assert selftest.DEPFORMER_TOL == test_depformer_frame.TOL
    assert selftest.CONV_TOL == test_conv1d_stream.TOL == test_conv_transpose1d_stream.TOL


def test_a_wrong_kernel_fails_its_check(monkeypatch):
    """The checks see a kernel that is off: a fused matvec one unit too large everywhere."""
    right = _ext.matvec
    monkeypatch.setattr(_ext, "matvec", lambda *a: right(*a) + 1)
    [result] = selftest.run(selftest.tiny_shapes(), names=("matvec",))
    assert not result.ok and result.worst > 10 and result.error is None


@pytest.fixture
def validating(monkeypatch, tmp_path):
    """The CPU as a GPU whose kernels are validated, at the tiny shapes, into a fresh cache."""
    monkeypatch.setenv("PERSONAPLEX_FAST_CACHE", str(tmp_path))
    monkeypatch.setattr(ops, "validates_here", lambda: True)
    monkeypatch.setattr(selftest, "default_shapes", lambda batch=1: selftest.tiny_shapes(batch))
    monkeypatch.setattr(ops, "_verdicts", {})
    calls = {}
    for name in selftest.PRIMITIVES:
        fn = getattr(_ext, name)
        monkeypatch.setattr(_ext, name, lambda *a, _fn=fn, _name=name, **k: (calls.update({_name: calls.get(_name, 0) + 1}),
                                                                         _fn(*a, **k))[1])
    yield calls
    ops.set_kernels("auto")
    ops.set_mode("fused")


def fails(why):
    def check(shapes, draw):
        if isinstance(why, Exception):
            raise why
        yield "forced", why
    return check


def operands():
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((2, 64)).astype(np.float32))
    w = mx.array(rng.standard_normal((16, 64)).astype(np.float32))
    q = mx.array(rng.standard_normal((2, 2, 1, 16)).astype(np.float32))
    kc = mx.array(rng.standard_normal((2, 2, 8, 16)).astype(np.float32))
    return x, w, q, kc


def test_a_failing_primitive_runs_its_reference_with_one_warning(validating, monkeypatch, tmp_path):
    monkeypatch.setitem(selftest.CHECKS, "matvec", fails(3.0))
    x, w, q, kc = operands()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = ops.matvec(x, w)  # the first op runs the self-test
        validating.clear()
        y = ops.matvec(x, w)
        out = ops.ring_attention(q, q, q, kc, kc, mx.array([3, 4]))
    mx.eval(y, *out)
    assert [str(c.message).split(" failed")[0] for c in caught] == ["personaplex_fast: matvec"]
    assert "forced: error 3 x its tolerance" in str(caught[0].message)
    np.testing.assert_array_equal(np.array(y), np.array(reference.matvec(x, w)))
    assert validating == {"ring_attention": 1}  # matvec took its reference, the others stay fused
    assert ops.fallbacks() == {"matvec": "forced: error 3 x its tolerance"}
    assert len(list((tmp_path / "selftest").glob("*.json"))) == 1


def test_a_kernel_that_does_not_build_falls_back(validating, monkeypatch):
    error = RuntimeError("kernels/metal/rvq.metal does not compile here: [metal::Device] Unable to build")
    monkeypatch.setitem(selftest.CHECKS, "rvq_encode", fails(error))
    with pytest.warns(RuntimeWarning, match="rvq_encode failed its self-test"):
        codes = ops.rvq_encode(mx.zeros((3, 4)), mx.ones((2, 5, 4)))
    assert ops.fallbacks() == {"rvq_encode": f"RuntimeError: {error}"}
    assert "rvq_encode" not in validating and codes.shape == (3, 2)


def test_the_verdict_is_cached_per_device(validating, monkeypatch):
    monkeypatch.setitem(selftest.CHECKS, "matvec", fails(2.0))
    with pytest.warns(RuntimeWarning, match="matvec"):
        assert ops.fallbacks() == {"matvec": "forced: error 2 x its tolerance"}
    monkeypatch.setattr(ops, "_verdicts", {})  # a new process
    monkeypatch.setattr(selftest, "run", lambda *a, **k: pytest.fail("the cached verdict was not used"))
    with pytest.warns(RuntimeWarning, match="matvec"):
        assert ops.fallbacks() == {"matvec": "forced: error 2 x its tolerance"}
    monkeypatch.setattr(ops, "_verdicts", {})
    monkeypatch.setattr(selftest, "device_name", lambda: "gpu: another")
    with pytest.raises(pytest.fail.Exception, match="cached verdict"):
        ops.fallbacks()


def test_fused_kernels_ignore_the_verdict_and_reference_takes_none(validating, monkeypatch, tmp_path):
    monkeypatch.setitem(selftest.CHECKS, "matvec", fails(3.0))
    x, w, *_ = operands()
    ops.set_kernels("fused")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mx.eval(ops.matvec(x, w))
    assert validating["matvec"] == 1 and ops.fallbacks() == {}
    assert not (tmp_path / "selftest").exists()
    ops.set_kernels("reference")
    assert ops.mode() == "reference"
    mx.eval(ops.matvec(x, w))
    assert validating["matvec"] == 1


def test_the_commands_take_kernels(monkeypatch):
    from personaplex_fast.cli import _set_ops_mode, build_parser

    args = build_parser().parse_args(["offline", "--model", "m", "--input-wav", "a", "--output-wav", "b",
                                      "--output-text", "c", "--kernels", "reference"])
    _set_ops_mode(args)
    assert ops.mode() == "reference" and ops.kernels() == "reference"
    for command in (["chat", "--model", "m"], ["serve", "--model", "m"], ["lm-run", "--model", "m"]):
        assert build_parser().parse_args(command).kernels == "auto"
    ops.set_kernels("auto")
    ops.set_mode("fused")
