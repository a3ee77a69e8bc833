"""Compiles the Metal host code (csrc/*_metal.cpp, csrc/metal_common.cpp) on Linux as a
Mac build would, and checks what it calls into MLX against what libmlx.dylib exports.

What stands in for a Mac, from MLX's own macOS wheel `mlx-metal==<MLX's version>` (its
include/ holds MLX's headers and metal-cpp for that version, its lib/ libmlx.dylib):
- clang for arm64-apple-macosx14.0 with -fblocks (metal-cpp needs blocks; g++ has none),
  so names mangle as Apple clang mangles them;
- libc++'s headers (Debian's libc++-22-dev): MLX's API is in std::__1 types;
- aarch64 glibc headers (libc6-dev-arm64-cross) for the C library, with Darwin's 64-bit
  integer types in an overlay (int64_t is long long on Darwin, long in glibc, and it
  mangles differently: MLX's strides and byte offsets are int64_t);
- tests/metal/apple/: minimal stand-ins for the Apple system headers (objc,
  CoreFoundation, dispatch, IOSurface, mach, TargetConditionals, xlocale).
Then every undefined symbol of the objects in MLX's or metal-cpp's namespaces (mlx::,
MTL::, MTL4::, NS::, CA::) must be exported by libmlx.dylib (its export trie, read here
from the Mach-O): a call into something MLX does not export is a link error on a Mac.
C symbols (the Objective-C runtime) and libc++'s are left to the system's libraries.

Not seen: whether the kernels exist under the names the host asks for, and anything only
a run shows (the self-test does that where the kernels run: selftest.py).

    python tests/metal/host.py [--wheel mlx_metal-0.32.4-...whl]   # default: $PERSONAPLEX_MLX_METAL_WHEEL
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APPLE = Path(__file__).resolve().parent / "apple"
GLIBC = Path("/usr/aarch64-linux-gnu/include")  # libc6-dev-arm64-cross
TARGET = "arm64-apple-macosx14.0"  # the wheel's platform tag
SOURCES = sorted([ROOT / "csrc/metal_common.cpp", *(ROOT / "csrc").glob("*_metal.cpp")])
# MLX's and metal-cpp's namespaces, as Itanium-mangled names start (Mach-O adds a `_`):
# N[K] nested names, TI / TV / TS typeinfo, vtables and typeinfo names.
MLX_SYMBOL = re.compile(r"^__Z(?:T[IVS])?N?K?(?:3mlx|3MTL|4MTL4|2NS|2CA)\d")
ENV_WHEEL = "PERSONAPLEX_MLX_METAL_WHEEL"


def wheel_path(given: str | None = None) -> Path | None:
    path = given or os.environ.get(ENV_WHEEL)
    return Path(path) if path and Path(path).is_file() else None


def unpack_headers(wheel: Path, into: Path) -> Path:
    """The wheel's mlx/include/ under `into`; returns that include directory."""
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("mlx/include/") and not name.endswith("/"):
                z.extract(name, into)
    return into / "mlx" / "include"


def wheel_version(include: Path) -> str:
    text = (include / "mlx" / "version.h").read_text()
    parts = [re.search(rf"#define MLX_VERSION_{p} (\d+)", text).group(1) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(parts)


def libmlx(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        return z.read("mlx/lib/libmlx.dylib")


def toolchain(clang: str) -> dict[str, Path] | str:
    """libc++'s and clang's own headers for this clang, and glibc's aarch64 headers; or
    what is missing, as a sentence."""
    resource = Path(subprocess.run([clang, "-print-resource-dir"], capture_output=True, text=True,
                                   check=True).stdout.strip())
    libcxx = resource.parents[2] / "include" / "c++" / "v1"  # <llvm>/lib/clang/N -> <llvm>/include/c++/v1
    if not (libcxx / "vector").is_file():
        return f"no libc++ headers at {libcxx} (apt-get install libc++-{resource.name}-dev)"
    if not (GLIBC / "bits" / "types.h").is_file():
        return f"no aarch64 C library headers at {GLIBC} (apt-get install libc6-dev-arm64-cross)"
    return {"libcxx": libcxx, "resource": resource / "include"}


def darwin_overlay(into: Path) -> Path:
    """glibc's bits/types.h with int64_t / uint64_t as Darwin has them (long long)."""
    text = (GLIBC / "bits" / "types.h").read_text()
    for sign in ("signed", "unsigned"):
        name = "__int64_t" if sign == "signed" else "__uint64_t"
        line = f"typedef {sign} long int {name};"
        if line not in text:
            raise RuntimeError(f"{GLIBC}/bits/types.h has no `{line}`: update darwin_overlay")
        text = text.replace(line, f"typedef {sign} long long int {name};", 1)
    (into / "bits").mkdir(parents=True, exist_ok=True)
    (into / "bits" / "types.h").write_text(text)
    return into


def flags(clang: str, tools: dict[str, Path], include: Path, overlay: Path, csrc: Path) -> list[str]:
    return [clang, "-target", TARGET, "-std=c++20", "-fblocks", "-O0", "-fno-color-diagnostics",
            "-ferror-limit=20", "-nostdinc", "-nostdinc++",
            # Darwin's clang predefines these nullability words; glibc's headers use them as macros.
            "-U__nonnull", "-U__nullable", "-D_GNU_SOURCE",
            "-isystem", str(tools["libcxx"]), "-isystem", str(tools["resource"]), "-isystem", str(APPLE),
            "-isystem", str(overlay), "-isystem", str(GLIBC),
            "-I", str(include), "-I", str(include / "metal_cpp"), "-I", str(csrc), "-I", str(csrc.parent / "kernels"),
            # MLXConfig.cmake's MLX_CXX_FLAGS for the Metal build, and CMakeLists.txt's.
            "-D_METAL_", "-DACCELERATE_NEW_LAPACK", "-DPERSONAPLEX_METAL_BUILD"]


def compile_all(command: list[str], sources: list[Path], out: Path) -> tuple[list[Path], list[str]]:
    """Objects, and the compile errors (one string per failing source)."""
    def one(src: Path):
        obj = out / (src.stem + ".o")
        r = subprocess.run([*command, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
        return obj, (None if r.returncode == 0 else f"{src.name} does not compile:\n{r.stderr.strip()}")

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        results = list(pool.map(one, sources))
    return [o for o, e in results if e is None], [e for _, e in results if e]


# -- Mach-O (64-bit, little-endian; a fat file's arm64 slice)

LC_SYMTAB, LC_DYLD_INFO, LC_DYLD_INFO_ONLY, LC_DYLD_EXPORTS_TRIE = 0x2, 0x22, 0x80000022, 0x80000033
CPU_ARM64 = 0x0100000C


def _slice(data: bytes) -> bytes:
    if struct.unpack_from(">I", data)[0] == 0xCAFEBABE:  # fat: find arm64
        for i in range(struct.unpack_from(">I", data, 4)[0]):
            cpu, _, offset, size, _ = struct.unpack_from(">iiIII", data, 8 + 20 * i)
            if cpu == CPU_ARM64:
                return data[offset:offset + size]
        raise ValueError("no arm64 slice in the fat Mach-O file")
    if struct.unpack_from("<I", data)[0] != 0xFEEDFACF:
        raise ValueError("not a 64-bit Mach-O file")
    return data


def _commands(data: bytes):
    ncmds = struct.unpack_from("<I", data, 16)[0]
    at = 32
    for _ in range(ncmds):
        cmd, size = struct.unpack_from("<II", data, at)
        yield cmd, at
        at += size


def undefined_symbols(obj: bytes) -> set[str]:
    """External symbols an object references but does not define."""
    data = _slice(obj)
    out = set()
    for cmd, at in _commands(data):
        if cmd == LC_SYMTAB:
            symoff, nsyms, stroff, _ = struct.unpack_from("<IIII", data, at + 8)
            for i in range(nsyms):
                strx, ntype, _, _, _ = struct.unpack_from("<IBBHQ", data, symoff + 16 * i)
                if (ntype & 0xE0) == 0 and (ntype & 0x01) and (ntype & 0x0E) == 0:  # not stab, external, undefined
                    end = data.index(b"\0", stroff + strx)
                    out.add(data[stroff + strx:end].decode())
    return out


def _uleb(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def exported_symbols(dylib: bytes) -> set[str]:
    """The names in a dylib's export trie: what dyld binds other images' references to."""
    data = _slice(dylib)
    trie = None
    for cmd, at in _commands(data):
        if cmd == LC_DYLD_EXPORTS_TRIE:
            off, size = struct.unpack_from("<II", data, at + 8)
            trie = data[off:off + size]
        elif cmd in (LC_DYLD_INFO, LC_DYLD_INFO_ONLY):
            off, size = struct.unpack_from("<II", data, at + 40)
            trie = data[off:off + size]
    if not trie:
        raise ValueError("no export trie in the dylib")
    names, stack = set(), [(0, b"")]
    while stack:
        node, prefix = stack.pop()
        terminal, at = _uleb(trie, node)
        if terminal:
            names.add(prefix.decode())
        at += terminal  # the symbol's flags and address, then the children
        count, at = trie[at], at + 1
        for _ in range(count):
            end = trie.index(b"\0", at)
            edge = trie[at:end]
            child, at = _uleb(trie, end + 1)
            stack.append((child, prefix + edge))
    return names


def demangled(names) -> list[str]:
    """Readable names where c++filt (binutils) is there; the mangled ones otherwise."""
    names = sorted(names)
    if shutil.which("c++filt"):
        r = subprocess.run(["c++filt", "--strip-underscore"], input="\n".join(names), capture_output=True,
                           text=True)
        if r.returncode == 0:
            return [f"{d} ({m})" for d, m in zip(r.stdout.splitlines(), names)]
    return names


def check(clang: str, wheel: Path, work: Path, csrc: Path = ROOT / "csrc",
          sources: list[Path] | None = None) -> list[str]:
    """Problems: compile errors, then MLX / metal-cpp symbols libmlx.dylib does not export."""
    tools = toolchain(clang)
    if isinstance(tools, str):
        return [tools]
    work.mkdir(parents=True, exist_ok=True)
    include = unpack_headers(wheel, work / "wheel")
    overlay = darwin_overlay(work / "darwin")
    (work / "obj").mkdir(exist_ok=True)
    sources = sources if sources is not None else sorted([csrc / "metal_common.cpp", *csrc.glob("*_metal.cpp")])
    command = flags(clang, tools, include, overlay, csrc)
    # MLX's and metal-cpp's headers once, as a precompiled header every source starts
    # with (4-5 s of parsing a file otherwise); every source includes these itself too.
    header = work / "metal_host.h"
    header.write_text('#include "metal_common.h"\n#include "mlx/ops.h"\n#include "mlx/primitives.h"\n')
    r = subprocess.run([*command, "-x", "c++-header", str(header), "-o", f"{header}.pch"], capture_output=True,
                       text=True)
    if r.returncode:
        return [f"metal_common.h with MLX's headers does not compile:\n{r.stderr.strip()}"]
    objects, problems = compile_all([*command, "-include-pch", f"{header}.pch"], sources, work / "obj")
    exports = exported_symbols(libmlx(wheel))
    for obj in objects:
        missing = {s for s in undefined_symbols(obj.read_bytes()) if MLX_SYMBOL.match(s)} - exports
        problems += [f"{obj.stem}.o calls {s}, which libmlx.dylib does not export" for s in demangled(missing)]
    return problems


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from check import find_clang

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheel", help=f"the mlx-metal wheel (default: ${ENV_WHEEL})")
    p.add_argument("--work", default="build/metal-host", help="where the headers and objects go")
    a = p.parse_args(argv)
    wheel, clang = wheel_path(a.wheel), find_clang()
    if wheel is None or clang is None:
        print("need the mlx-metal wheel (--wheel) and clang >= 21", file=sys.stderr)
        return 2
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    problems = check(clang, wheel, work)
    for line in problems:
        print(line)
    if not problems:
        print(f"{len(SOURCES)} Metal host files compile for {TARGET} against MLX {wheel_version(work / 'wheel/mlx/include')}"
              " and call only what libmlx.dylib exports")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
