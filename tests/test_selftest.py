"""selftest: every fused primitive passes its self-test on the CPU at the tiny model's
shapes (what CI can run; `personaplex-fast selftest` on the GPUs is run by hand), with the
tests' own tolerances; under "auto" kernels a primitive whose check fails (forced here) or
whose kernels do not build falls back to its reference with one warning naming it, the
verdict cached per device; "fused" kernels ignore it. The rows of what only the tick program
runs (selftest_tick.py: the 8-bit KV ring's attention, the program against op by op) fail
when their op is off, and their failures keep the engine off the program (8-bit caches
only, for the attention). Here the CPU stands in for a GPU (ops.validates_here), at the
tiny shapes. About 10 s.
"""

import os
import warnings
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import test_conv1d_stream
import test_conv_transpose1d_stream
import test_decoder_layers
import test_depformer_frame
import test_kv8
import test_matvec
import test_ring_attention
import test_tick

from personaplex_fast import _ext, ops, reference, selftest, selftest_tick, tick
from personaplex_fast.cli import main
from personaplex_fast.engine import Engine
from personaplex_fast.sampling import SamplingConfig


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
    assert (selftest_tick.KV8_SCALE_RTOL, selftest_tick.KV8_CODE_FLIPS) == (test_kv8.SCALE_RTOL, test_kv8.CODE_FLIPS)
    assert selftest_tick.TICK_AGREE["cpu"] == (selftest_tick.TICK_FRAMES, test_tick.AUDIO_TOL)


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
    for name in (n for n in selftest.PRIMITIVES if hasattr(_ext, n)):
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
        assert ops.fallbacks() == {"rvq_encode": f"RuntimeError: {error}"}
    validating.clear()  # the self-test's tick row ran the op-by-op engine's kernels
    codes = ops.rvq_encode(mx.zeros((3, 4)), mx.ones((2, 5, 4)))
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


# -- the rows of what only the tick program runs: the 8-bit ring's attention, the program

@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16], ids=["f32", "bf16", "f16"])
def test_the_8bit_attention_passes_on_the_cpu(dtype):
    [r] = selftest.run(replace(selftest.tiny_shapes(), dtype=dtype), names=("ring_attention_kv8",))
    assert r.ok and r.cases == 6, r


def test_the_program_passes_on_the_cpu():
    [r] = selftest.run(selftest.tiny_shapes(), names=("tick",))
    assert r.ok and [r.cases, r.worst_case.split()[0]] == [4, "audio"], r


def shifted(fn, out=0.0, step=0):
    """tick.ring_attention off: out shifted, and `step` added to the first code of every
    key row (test_kv8's bound allows one step in 1% of the codes)."""
    def wrong(*a, **k):
        o, (kc, ks), v = fn(*a, **k)
        kc = kc.astype(mx.int32)
        kc = mx.concatenate([kc[..., :1] + step, kc[..., 1:]], axis=-1).astype(mx.int8)
        return o + out, (kc, ks), v
    return wrong


@pytest.mark.parametrize("out,step,case", [(0.1, 0, "out"), (0.0, 1, "k ring"), (0.0, 2, "k ring")])
def test_a_wrong_8bit_attention_fails_its_check(monkeypatch, out, step, case):
    monkeypatch.setattr(tick, "ring_attention", shifted(tick.ring_attention, out, step))
    [r] = selftest.run(selftest.tiny_shapes(), names=("ring_attention_kv8",))
    assert not r.ok and r.error is None and r.worst_case.endswith(case), r
    assert r.worst >= 2, r  # one step in 1/32 of the codes: 3 x the share allowed; two steps: 2 x


@pytest.mark.parametrize("wrong", ["audio", "tokens"])
def test_a_wrong_program_fails_its_check(monkeypatch, wrong):
    right = tick.TickRunner.__call__

    def off(self, pcm, control):
        audio, tokens = right(self, pcm, control)
        return (audio * 1.001, tokens) if wrong == "audio" else (audio, mx.where(tokens >= 0, tokens + 1, tokens))
    monkeypatch.setattr(tick.TickRunner, "__call__", off)
    [r] = selftest.run(selftest.tiny_shapes(), names=("tick",))
    assert not r.ok and r.error is None and r.worst_case.startswith(wrong), r


@pytest.fixture(scope="module")
def tiny_model():
    return selftest_tick.tiny_model()


def only(monkeypatch, *names):
    """The self-test's other rows pass untested (the forced failures below are in `names`)."""
    for name in selftest.PRIMITIVES:
        if name not in names:
            monkeypatch.setitem(selftest.CHECKS, name, fails(0.0))


def engines(lm, mimi, kv_bits):
    return Engine(lm, mimi, slots=2, sampling=SamplingConfig(greedy=True), kv_bits=kv_bits)


def test_a_failing_8bit_attention_keeps_8bit_engines_off_the_program(validating, monkeypatch, tiny_model):
    only(monkeypatch, "ring_attention_kv8", "tick")
    monkeypatch.setattr(tick, "ring_attention", shifted(tick.ring_attention, 0.1))
    with pytest.warns(RuntimeWarning, match=r"ring_attention_kv8 failed its self-test .*T=1 out.*--kv-bits 8\) the "
                                            "engine runs op by op"):
        eight = engines(*tiny_model, kv_bits=8)
    assert eight.program is None and eight.lm_state.kv.bits == 8
    assert list(ops.fallbacks()) == ["ring_attention_kv8"]  # the program's own row passed
    assert engines(*tiny_model, kv_bits=None).program is not None  # its cache runs no 8-bit ring
    eight.join()
    assert eight.tick(np.zeros((2, 1920), np.float32)).pcm.shape == (2, 1920)


def test_a_failing_program_sends_the_engine_op_by_op(validating, monkeypatch, tiny_model):
    only(monkeypatch, "tick")
    right = tick.TickRunner.__call__
    monkeypatch.setattr(tick.TickRunner, "__call__", lambda self, pcm, control: (lambda a, t: (a + 0.5, t))(
        *right(self, pcm, control)))
    with pytest.warns(RuntimeWarning, match=r"tick failed its self-test .*audio.*the engine runs op by op"):
        assert ops.fallbacks().keys() == {"tick"}
    for kv_bits in (None, 8):
        assert engines(*tiny_model, kv_bits).program is None
    with ops.use_kernels("fused"):  # untested kernels: the program again
        assert engines(*tiny_model, None).program is not None
    assert ops.kernels() == "auto" and ops.mode() == "fused"


def test_a_failing_tensor_core_path_turns_only_it_off(validating, monkeypatch, tiny_model):
    """matvec_tc failing: matvec keeps its streaming kernel at every row count (the CUDA
    hosts read PERSONAPLEX_MATVEC_TC_MIN_ROWS per call), and nothing else changes: the
    engine still runs the program, matvec its fused primitive."""
    monkeypatch.delenv("PERSONAPLEX_MATVEC_TC_MIN_ROWS", raising=False)  # restored after the test
    only(monkeypatch, "matvec_tc")
    monkeypatch.setitem(selftest.CHECKS, "matvec_tc", fails(5.0))
    with pytest.warns(RuntimeWarning, match=r"matvec_tc failed its self-test .*streaming kernel at every row count"):
        assert ops.fallbacks() == {"matvec_tc": "forced: error 5 x its tolerance"}
    assert int(os.environ["PERSONAPLEX_MATVEC_TC_MIN_ROWS"]) > 64
    assert ops.program_applies() and ops.program_applies(kv_bits=8)
    assert engines(*tiny_model, None).program is not None
    x, w, _, _ = operands()
    validating.clear()
    mx.eval(ops.matvec(x, w))
    assert validating == {"matvec": 1}


def test_the_tensor_core_row_checks_17_rows(monkeypatch):
    """The row's cases are matvec's, at 17 rows whatever the batch asked for."""
    seen = []
    right = _ext.matvec
    monkeypatch.setattr(_ext, "matvec", lambda x, *a: (seen.append(x.shape[0]), right(x, *a))[1])
    [result] = selftest.run(selftest.tiny_shapes(batch=2), names=("matvec_tc",))
    assert result.ok and result.cases == 7 and set(seen) == {17}  # tiny ffn_out: K not whole groups


def test_the_program_rows_have_no_cases_where_there_is_no_program(monkeypatch):
    """Metal (a GPU build without CUDA) has no tick program: the rows say so and pass."""
    monkeypatch.setattr(selftest_tick, "program_device", lambda: None)
    shapes = selftest.tiny_shapes()
    results = selftest.run(shapes, names=("ring_attention_kv8", "tick"))
    assert [(r.ok, r.cases) for r in results] == [(True, 0), (True, 0)]
    assert selftest.table(results, shapes).count("n/a (not run on this device)") == 2


def test_a_changed_check_is_run_again_not_read_from_the_cache(validating, monkeypatch, tmp_path):
    """The cached verdict's key covers the checks' own sources: a fixed check (as the
    tensor-core row's reference on 2026-12-01) must not keep an old failure."""
    from personaplex_fast import selftest_tick

    selftest.verdict()
    assert selftest.cached()
    edited = tmp_path / "selftest_tick.py"
    edited.write_bytes(Path(selftest_tick.__file__).read_bytes() + b"\n# a changed tolerance\n")
    monkeypatch.setattr(selftest_tick, "__file__", str(edited))
    assert not selftest.cached()
