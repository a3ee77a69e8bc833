"""The Metal kernels (kernels/metal/*.metal, whichever exist) type-check through the shim
of tests/metal/check.py (clang's C++ for OpenCL front end; its docstring says what that
sees and what it cannot), each of its checks fails on a deliberately broken copy of the
kernels, and the kernel emulator runs every kernel body the Metal kernels call.

clang >= 21 comes from Debian: bookworm's newest is clang-22, in bookworm-security, which
.ci/run installs. Where no such clang is found the type-check tests skip (in CI they fail;
the emulator audit runs either way). About 3 s of CPU for the whole file on this machine.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metal import check

ROOT = Path(__file__).resolve().parents[1]
METAL = sorted((ROOT / "kernels/metal").glob("*.metal"))


@pytest.fixture(scope="module")
def clang():
    """The newest clang >= 21 here; skips without one, except in CI (.ci/run installs it)."""
    found = check.find_clang()
    if found is None:
        why = f"no clang >= {check.MIN_CLANG} (Debian bookworm: apt-get install clang-22)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}: .ci/run should have installed it")
        pytest.skip(why)
    return found


@pytest.mark.parametrize("metal", METAL, ids=lambda p: p.name)
def test_metal_file_type_checks(clang, metal):
    assert check.check(metal, clang) == []


# What a Mac compiles at run time: each .metal that a csrc/NAME_metal.cpp dispatches,
# flattened into one text by cmake/metal_source.py as the build embeds it.
RUNTIME = [m for m in METAL if (ROOT / "csrc" / f"{m.stem}_metal.cpp").exists()]


@pytest.mark.parametrize("metal", RUNTIME, ids=lambda p: p.name)
def test_runtime_source_type_checks(clang, metal, tmp_path):
    flat = tmp_path / metal.name
    subprocess.run([sys.executable, str(ROOT / "cmake/metal_source.py"), str(metal), str(flat)], check=True)
    assert '#include "' not in flat.read_text()
    assert check.check(flat, clang) == []


def test_runtime_sources_cover_every_host():
    """Every Metal host's kernels are a .metal file (decoder_layers only chains others')."""
    hosts = {p.stem[:-len("_metal")] for p in (ROOT / "csrc").glob("*_metal.cpp")} - {"decoder_layers"}
    assert hosts == {m.stem for m in RUNTIME}


# (what is broken, file under kernels/, text, its broken form, the .metal that shows it,
# a piece of the problem it must give)
BROKEN = [
    ("a misspelt builtin", "portable.h", "simd_shuffle_xor(", "simd_shufle_xor(",
     "depformer_frame.metal", "undeclared identifier 'simd_shufle_xor'"),
    ("a write to a constant argument", "metal/rvq.metal", "  rvq::decode(codes,",
     "  a.n = 0;\n  rvq::decode(codes,", "rvq.metal", "cannot assign to variable 'a'"),
    ("a write through a constant pointer", "metal/rvq.metal",
     "uint tid [[thread_index_in_threadgroup]]) {\n  rvq::decode(",
     "uint tid [[thread_index_in_threadgroup]], constant float* table [[buffer(4)]]) {\n"
     "  table[0] = 0.f;\n  rvq::decode(", "rvq.metal", "read-only variable is not assignable"),
    ("an output buffer in constant", "metal/rvq.metal", "device float* out [[buffer(2)]]",
     "constant float* out [[buffer(2)]]", "rvq.metal",
     "cannot initialize a parameter of type '__global float *'"),
    ("a program-scope constexpr outside constant", "depformer_frame.cuh",
     "PP_CONSTANT constexpr int kEmbedThreads", "constexpr int kEmbedThreads", "depformer_frame.metal",
     "program scope variable must reside in constant address space"),
    ("a double", "depformer_frame.cuh", "float e = 0.f;", "double e = 0.;", "depformer_frame.metal",
     "use of type 'double' requires"),
    ("a variable named half", "matvec.cuh", "for (int part = 0; part <", "for (int half = 0; half <",
     "matvec.metal", "cannot combine with previous 'int' declaration specifier"),
    ("a repeated buffer index", "metal/depformer_frame.metal", "[[buffer(4)]]", "[[buffer(3)]]",
     "depformer_frame.metal", "argument a: [[buffer(3)]] is already taken"),
    ("a built-in input of a wrong type", "metal/depformer_frame.metal",
     "uint tid [[thread_index_in_threadgroup]]", "int tid [[thread_index_in_threadgroup]]",
     "depformer_frame.metal", "[[thread_index_in_threadgroup]] takes uint or ushort, not int"),
    ("a misspelt built-in", "metal/depformer_frame.metal", "[[thread_index_in_threadgroup]]",
     "[[thread_index_in_threadgroop]]", "depformer_frame.metal",
     "unknown attribute [[thread_index_in_threadgroop]]"),
    ("a scalar argument outside a buffer", "metal/rvq.metal", "constant int& q [[buffer(5)]]", "int q",
     "rvq.metal", "argument q: neither a buffer nor a built-in input"),
    ("threadgroup memory over 32 KB", "metal/ring_attention.metal", "ring::kWarps * TQ * (D + 2)]",
     "ring::kWarps * TQ * (D + 2) * 4]", "ring_attention.metal",
     "kernel ring_attend_f32_d128_q4: threadgroup memory over 32 KB"),
    ("a pointer without an address space", "formats.cuh", "pp_u32x4 r, PP_THREAD float* out)",
     "pp_u32x4 r, float* out)", "depformer_frame.metal",
     "formats.cuh:56: out is a pointer or reference without an address space"),
]


@pytest.mark.parametrize("what, file, text, broken, metal, problem", BROKEN, ids=[b[0] for b in BROKEN])
def test_check_fails_on_a_broken_copy(clang, tmp_path, what, file, text, broken, metal, problem):
    kernels = tmp_path / "kernels"
    shutil.copytree(ROOT / "kernels", kernels, ignore=shutil.ignore_patterns("cuda"))
    source = (kernels / file).read_text()
    assert text in source, f"kernels/{file} no longer has {text!r}: pick another line to break"
    (kernels / file).write_text(source.replace(text, broken, 1))
    problems = check.check(kernels / "metal" / metal, clang)
    assert any(problem in p for p in problems), (what, problems)


def unemulated_bodies(metal_files):
    """The kernel bodies (namespace::body) the .metal files call that no driver of the kernel
    emulator (tests/emulator/*.cpp) built by a test runs."""
    called = {b for f in metal_files for b in re.findall(r"\b(\w+::\w+)\s*(?:<[^;{}()]*>)?\s*\(",
                                                          f.read_text())}
    tests = "\n".join(f.read_text() for f in (ROOT / "tests").glob("test_*emulator*.py"))
    built = [f.read_text() for f in (ROOT / "tests/emulator").glob("*.cpp") if f'"{f.stem}"' in tests]
    assert called, "no kernel body calls found: has the .metal layout changed?"
    return sorted(b for b in called if not any(re.search(rf"\b{b}\s*[<(]", t) for t in built))


def test_emulator_runs_every_body_the_metal_kernels_call(tmp_path):
    """The emulator is what sees a missing barrier or a divergent shuffle, which the type check
    cannot: every body a Metal kernel calls must run there, against the CPU path. A new
    kernel calling a body without a driver fails."""
    assert unemulated_bodies(METAL) == []
    new = tmp_path / "tick.metal"
    new.write_text('#include "../tick.cuh"\n[[kernel]] void tick_f32(device float* x [[buffer(0)]], '
                   "uint g [[threadgroup_position_in_grid]]) { tick::step<pp::F32>(x, g); }\n")
    assert unemulated_bodies([*METAL, new]) == ["tick::step"]
