"""The self-test on the GPU at the official 7B shapes: every row must pass here, or the
program and the primitives would quietly fall back to slower paths on the very device
they were written for (as the tensor-core row did on the H200 on 2026-12-01: its
reference kept the weights in float32 while the path rounds them to the dtype of x)."""

from personaplex_fast import selftest


def test_every_row_passes_at_the_official_shapes():
    shapes = selftest.default_shapes()
    results = selftest.run(shapes)
    failed = [r for r in results if not r.ok]
    assert not failed, selftest.table(results, shapes)
    assert all(r.cases for r in results if r.name in ("matvec", "matvec_tc", "ring_attention")), \
        selftest.table(results, shapes)
