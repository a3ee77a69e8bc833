"""The Metal host code (csrc/*_metal.cpp) compiles for arm64-apple-macosx against MLX's own
headers and metal-cpp from the macOS wheel of the pinned MLX, and calls only what that
wheel's libmlx.dylib exports (tests/metal/host.py says how, and what stands in for a Mac);
each check fails on a deliberately broken copy.

Needs the wheel (`pip download mlx-metal==<MLX's version> --platform macosx_14_0_arm64
--only-binary=:all: --no-deps`, named by $PERSONAPLEX_MLX_METAL_WHEEL), clang >= 21,
libc++-22-dev and libc6-dev-arm64-cross; .ci/run provides all four. Without them the tests
skip (in CI they fail). About 25 s on this machine's 2 cores.
"""

import os
import shutil

import mlx.core as mx
import pytest

from metal import check, host


def _need(what):
    if os.environ.get("CI"):
        pytest.fail(f"{what}: .ci/run should have provided it")
    pytest.skip(what)


@pytest.fixture(scope="module")
def clang():
    found = check.find_clang()
    if found is None:
        _need(f"no clang >= {check.MIN_CLANG}")
    tools = host.toolchain(found)
    if isinstance(tools, str):
        _need(tools)
    return found


@pytest.fixture(scope="module")
def wheel():
    found = host.wheel_path()
    if found is None:
        _need(f"no mlx-metal wheel (${host.ENV_WHEEL})")
    return found


def test_host_code_compiles_against_mlx_and_calls_only_its_exports(clang, wheel, tmp_path):
    assert host.check(clang, wheel, tmp_path) == []
    assert host.wheel_version(tmp_path / "wheel/mlx/include") == mx.__version__, "the wheel is not the pinned MLX"


# (what is broken, the source under csrc/, its text, the broken form, a piece of the problem)
BROKEN = [
    ("a wrong host API call", "metal_common.cpp", "enc.set_input_array(*b.a, idx, b.offset);",
     "enc.set_input_array(b.a, idx, b.offset);", "metal_common.cpp does not compile"),
    # MLX's own Metal code opens functions with this; it is declared in device.h but not exported.
    ("a non-exported symbol", "metal_common.cpp", "  MTL::Library* lib;\n",
     "  auto pool = mx::metal::new_scoped_memory_pool();\n  MTL::Library* lib;\n",
     "new_scoped_memory_pool"),
]


@pytest.mark.parametrize("what, source, text, broken, problem", BROKEN, ids=[b[0] for b in BROKEN])
def test_check_fails_on_a_broken_copy(clang, wheel, tmp_path, what, source, text, broken, problem):
    csrc = tmp_path / "csrc"
    shutil.copytree(host.ROOT / "csrc", csrc)
    shutil.copytree(host.ROOT / "kernels", tmp_path / "kernels")
    code = (csrc / source).read_text()
    assert text in code, f"csrc/{source} no longer has {text!r}: pick another line to break"
    (csrc / source).write_text(code.replace(text, broken, 1))
    problems = host.check(clang, wheel, tmp_path / "work", csrc=csrc, sources=[csrc / source])
    assert any(problem in p for p in problems), (what, problems)
    if what == "a non-exported symbol":  # it compiles: only the symbol check sees it
        assert all("does not compile" not in p for p in problems), problems
