"""GPU tests: collected only where MLX has a CUDA device (`python -m pytest tests/gpu`
on the GPU machine); elsewhere this folder is skipped without noise.

`poison`: a test module that says `pytestmark = pytest.mark.usefixtures("poison")` runs with
every output our CUDA kernels allocate filled with 0xFF bytes first (NaN for floats, -1
for int32), so an output element a kernel never writes shows."""

import mlx.core as mx
import pytest

if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture
def poison():
    from personaplex_fast import _ext

    _ext.set_gpu_poison(True)
    yield
    _ext.set_gpu_poison(False)


@pytest.fixture(autouse=True, scope="session")
def fused_kernels():
    """The tests test our kernels: never the self-test's fallbacks (ops' "auto" kernels),
    which a cached verdict could otherwise put in their place."""
    from personaplex_fast import ops

    ops.set_kernels("fused")
    yield
    ops.set_kernels("auto")
