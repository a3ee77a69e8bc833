"""One kernels/metal/NAME.metal as the single source text Metal compiles at run time.

MTLDevice's newLibraryWithSource takes one string and resolves no "..." includes,
so the kernel file and the headers it includes from kernels/ (portable.h,
formats.cuh, the bodies) are inlined here at every include, each wrapped in a guard
macro in place of its #pragma once (so the preprocessor keeps one copy, exactly as
it would have, whatever #if an include sits in), with #line markers so that a
compile error names the original file and line. <...> includes (metal_stdlib) are
left to Metal.

    python cmake/metal_source.py kernels/metal/NAME.metal OUT.cpp SYMBOL   # C++ for the build
    python cmake/metal_source.py kernels/metal/NAME.metal OUT.metal        # the text alone

The C++ form defines `extern "C" const char SYMBOL[]`, the text as raw string
literals (csrc/metal_common.cpp hands it to MLX's library cache).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*(?://.*)?$')
PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$")
# Raw string pieces: a delimiter the sources never contain, and pieces well under
# the 64K characters a compiler must accept in one literal.
DELIM = "pp_metal"
PIECE = 16000


def flatten(path: Path, stack: tuple[Path, ...] = ()) -> str:
    path = path.resolve()
    if path in stack:  # an include cycle: the guard would skip it there anyway
        return ""
    lines = path.read_text().splitlines()
    guard = None
    if any(PRAGMA_ONCE.match(line) for line in lines):
        guard = "PP_INLINED_" + re.sub(r"\W", "_", path.name).upper()
    out = [f"#ifndef {guard}\n#define {guard}\n"] if guard else []
    out.append(f'#line 1 "{path.name}"\n')
    for number, line in enumerate(lines, start=1):
        m = INCLUDE.match(line)
        if m:
            out.append(flatten(path.parent / m.group(1), (*stack, path)))
            out.append(f'#line {number + 1} "{path.name}"\n')
        elif PRAGMA_ONCE.match(line):
            out.append("\n")
        else:
            out.append(line + "\n")
    if guard:
        out.append(f"#endif  // {guard}\n")
    return "".join(out)


def as_cpp(text: str, symbol: str, source: Path) -> str:
    if f"){DELIM}\"" in text:
        raise SystemExit(f"{source}: contains the raw-string delimiter {DELIM!r}")
    pieces = [text[i:i + PIECE] for i in range(0, len(text), PIECE)]
    body = "\n".join(f'R"{DELIM}({p}){DELIM}"' for p in pieces)
    return (f"// Generated from {source.name} by cmake/metal_source.py: do not edit.\n"
            f'extern "C" const char {symbol}[] =\n{body};\n')


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 3):
        raise SystemExit(__doc__)
    source, out = Path(argv[0]), Path(argv[1])
    text = flatten(source)
    out.write_text(as_cpp(text, argv[2], source) if len(argv) == 3 else text)


if __name__ == "__main__":
    main(sys.argv[1:])
