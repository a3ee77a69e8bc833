"""Type-checks Metal kernels (kernels/metal/*.metal) on Linux, without Apple's compiler.

Each file goes through clang twice:
1. preprocessed (-E) against tests/metal/include/metal_stdlib, a stand-in for Metal's
   standard library written from Apple's Metal Shading Language Specification;
2. parsed as C++ for OpenCL with Metal's address spaces mapped onto OpenCL's
   (tests/metal/address_spaces.h) and OpenCL's program-scope global variables turned
   off, so that, as in Metal, these are errors: a program-scope variable outside
   `constant`, a write through `constant`, a pointer passed from one address space to
   another, threadgroup memory declared outside a kernel, a builtin the spec lacks,
   `double`.
Between the two, the kernels' declarations are read for what that mode cannot see:
Metal's attributes (unknown names, repeated or out-of-range [[buffer(n)]] and
[[threadgroup(n)]] indices, built-in inputs of a type the spec does not allow,
arguments that are neither buffers nor built-ins) and each kernel's threadgroup
arrays (a static_assert that they fit Apple GPUs' 32 KB; clang evaluates the sizes).
After the parse, clang's AST is searched for pointers and references declared without
an address space: OpenCL gives them its generic space, which Metal does not have.

Two shims stand between the source and clang, both marked where they are made:
- the kernels' [[kernel]] and parameter attributes become OpenCL's __kernel and
  nothing, once read;
- a `constant T&` kernel argument is read once into a const copy of the same name
  (a bit copy): clang cannot copy a class object out of __constant (its implicit copy
  constructor takes a __generic reference; llvm/llvm-project#153055 is the same gap
  in HLSL mode), which Metal does, and the kernels pass their launch scalars on by
  value. Writes to the copy still fail (it is const); passing it to a `constant T&`
  parameter would fail here though Metal accepts it.
Not seen: threadgroup memory a kernel takes as a [[threadgroup(n)]] argument (its
size is the host's), and anything only a real Metal compile or run shows (barriers
and shuffles are the kernel emulator's, tests/emulator).

Needs clang >= 21 (Debian bookworm: clang-22 from bookworm-security). Run
`python tests/metal/check.py [FILE.metal ...]` (default: every kernels/metal/*.metal);
prints one line per problem and exits 1 if there are any.
"""

import bisect
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIM = Path(__file__).resolve().parent / "include"
PRELUDE = Path(__file__).resolve().parent / "address_spaces.h"
MIN_CLANG = 21
METAL_VERSION = 300  # MSL 3.0, the kernels' floor (32-wide SIMD groups, simd_shuffle_xor)
THREADGROUP_BYTES = 32 * 1024  # Apple GPUs' threadgroup memory (Metal feature set tables)

LANGUAGE = ["-x", "clcpp", "-cl-std=clc++2021", "-cl-no-stdinc", "-target", "spir64"]
# OpenCL features Metal lacks: program-scope globals (device-side enqueue depends on
# them, so it goes too) and double.
PARSE = ["-Xclang", "-cl-ext=-__opencl_c_program_scope_global_variables,-__opencl_c_device_enqueue,"
         "-__opencl_c_fp64,-cl_khr_fp64", "-fsyntax-only", "-ferror-limit=0",
         "-fno-caret-diagnostics", "-fno-color-diagnostics", "-Xclang", "-ast-dump"]

SPACES = {"device", "constant", "threadgroup", "thread", "threadgroup_imageblock", "ray_data",
          "object_data"}
# MSL spec, "Attributes for kernel function input arguments": the built-ins and their types.
SCALAR = {"uint", "ushort"}
POSITION = {"uint", "uint2", "uint3", "ushort", "ushort2", "ushort3"}
BUILTINS = {
    **{name: SCALAR for name in (
        "dispatch_quadgroups_per_threadgroup", "dispatch_simdgroups_per_threadgroup",
        "quadgroup_index_in_threadgroup", "quadgroups_per_threadgroup",
        "simdgroup_index_in_threadgroup", "simdgroups_per_threadgroup", "thread_execution_width",
        "thread_index_in_quadgroup", "thread_index_in_simdgroup", "thread_index_in_threadgroup",
        "threads_per_simdgroup")},
    **{name: POSITION for name in (
        "dispatch_threads_per_threadgroup", "grid_origin", "grid_size", "thread_position_in_grid",
        "thread_position_in_threadgroup", "threadgroup_position_in_grid", "threadgroups_per_grid",
        "threads_per_grid", "threads_per_threadgroup")},
}
# Argument tables: [[kind(index)]], index below the limit (Metal feature set tables).
TABLES = {"buffer": 31, "threadgroup": 31, "texture": 128, "sampler": 16}
KERNEL_ATTRIBUTES = {"kernel", "max_total_threads_per_threadgroup", "host_name"}


def find_clang():
    """The newest clang-N on PATH with N >= MIN_CLANG, or None."""
    for n in range(MIN_CLANG + 20, MIN_CLANG - 1, -1):
        if path := shutil.which(f"clang-{n}"):
            return path
    return None


def closing(text, i):
    """Index of the bracket that closes the one at text[i]."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    depth = 0
    for j in range(i, len(text)):
        if text[j] == text[i]:
            depth += 1
        elif text[j] == pairs[text[i]]:
            depth -= 1
            if depth == 0:
                return j
    raise ValueError("unbalanced brackets")


def split_top(text, sep=","):
    """text split at `sep` outside brackets."""
    parts, depth, start = [], 0, 0
    for j, c in enumerate(text):
        depth += c in "([{<"
        depth -= c in ")]}>"
        if c == sep and depth == 0:
            parts.append(text[start:j])
            start = j + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def line_of(text, i):
    """(file, line) of offset i in preprocessed text, from its line markers."""
    last = None
    for last in re.finditer(r'^# (\d+) "([^"]*)".*$', text[:i], re.M):
        pass
    if last is None:
        return "?", text.count("\n", 0, i) + 1
    return last.group(2), int(last.group(1)) + text.count("\n", last.end(), i) - 1


class Kernel:
    """One kernel of the preprocessed text: where its parameters and body are."""

    def __init__(self, text, start, attrs_end, name, params, body):
        self.text, self.start, self.attrs_end, self.name = text, start, attrs_end, name
        self.params, self.body = params, body  # (open, close) offsets of ( ) and { }

    @functools.cached_property
    def where(self):
        file, line = line_of(self.text, self.start)
        return f"{file}:{line}: kernel {self.name}"


def find_kernels(text):
    """Every [[kernel]] (or `kernel`) function, or a problem where one cannot be read."""
    kernels, problems = [], []
    for m in re.finditer(r"\[\[\s*kernel\s*\]\]|\bkernel\b(?=\s+void\b)", text):
        head = re.match(r"((?:\s*\[\[[^\]]*\]\])*)\s*void\s+(\w+)\s*\(", text[m.end():])
        if not head:
            file, line = line_of(text, m.start())
            problems.append(f"{file}:{line}: a kernel this checker cannot read (write "
                            "`[[kernel]] void name(...) {...}`)")
            continue
        open_paren = m.end() + head.end() - 1
        close_paren = closing(text, open_paren)
        brace = re.match(r"\s*\{", text[close_paren + 1:])
        if not brace:
            file, line = line_of(text, m.start())
            problems.append(f"{file}:{line}: kernel {head.group(2)} has no body here")
            continue
        open_brace = close_paren + brace.end()
        kernels.append(Kernel(text, m.start(), m.end() + len(head.group(1)), head.group(2),
                              (open_paren, close_paren), (open_brace, closing(text, open_brace))))
        for attr in re.findall(r"\[\[([^\]]*)\]\]", head.group(1)):
            if re.match(r"\s*(\w+)", attr).group(1) not in KERNEL_ATTRIBUTES:
                problems.append(f"{kernels[-1].where}: unknown attribute [[{attr}]]")
    return kernels, problems


def read_param(param):
    """(attributes, type, name) of one kernel parameter."""
    attrs = [a for group in re.findall(r"\[\[(.*?)\]\]", param) for a in split_top(group)]
    decl = re.sub(r"\[\[.*?\]\]", "", param).strip()
    m = re.search(r"[\s*&](\w+)\s*$", decl)  # an unnamed argument is all type
    return (attrs, decl[:m.start() + 1].strip(), m.group(1)) if m else (attrs, decl, "")


def base_type(typ):
    """The type without qualifiers, address space, * or &, and without `metal::`."""
    words = [w for w in re.findall(r"[\w:]+", typ) if w not in SPACES | {"const", "volatile"}]
    return " ".join(words).removeprefix("metal::")


def scan_params(k):
    """Problems with kernel k's arguments, and the edits that remove their attributes and
    copy its `constant T&` arguments."""
    problems, edits, copies, taken, seen_builtins, widths = [], [], [], set(), set(), set()
    open_paren, close_paren = k.params
    params = split_top(k.text[open_paren + 1:close_paren])
    offset = open_paren + 1
    for param in params:
        at = k.text.index(param, offset)
        offset = at + len(param)
        attrs, typ, name = read_param(param)
        spaces = set(re.findall(r"\w+", typ)) & SPACES
        indirect = "*" in typ or "&" in typ
        where = f"{k.where}: argument {name}"
        for attr in attrs:
            m = re.fullmatch(r"(\w+)\s*(?:\((.*)\))?", attr)
            kind, arg = m.group(1), m.group(2)
            if kind in BUILTINS:
                if indirect or base_type(typ) not in BUILTINS[kind]:
                    problems.append(f"{where}: [[{kind}]] takes {' or '.join(sorted(BUILTINS[kind]))}, "
                                    f"not {typ}")
                if kind in seen_builtins:
                    problems.append(f"{where}: a second [[{kind}]]")
                seen_builtins.add(kind)
                if BUILTINS[kind] is POSITION and base_type(typ)[-1:].isdigit():
                    widths.add(base_type(typ)[-1])
            elif kind in TABLES:
                if not (arg or "").strip().isdigit():
                    problems.append(f"{where}: [[{attr}]]: this checker reads integer indices only")
                    continue
                index = int(arg)
                if index >= TABLES[kind]:
                    problems.append(f"{where}: [[{attr}]] is past the {TABLES[kind]} entries of "
                                    f"the {kind} table")
                if (kind, index) in taken:
                    problems.append(f"{where}: [[{kind}({index})]] is already taken")
                taken.add((kind, index))
                if kind == "buffer" and not (indirect and spaces & {"device", "constant"}):
                    problems.append(f"{where}: [[buffer(n)]] needs a device or constant pointer "
                                    "or reference")
                if kind == "threadgroup" and not (indirect and "threadgroup" in spaces):
                    problems.append(f"{where}: [[threadgroup(n)]] needs a threadgroup pointer")
            else:
                problems.append(f"{where}: unknown attribute [[{attr}]]")
        if indirect and not spaces & {"device", "constant", "threadgroup"}:
            problems.append(f"{where}: a kernel's pointers and references are device, constant "
                            "or threadgroup")
        elif not attrs:
            problems.append(f"{where}: neither a buffer nor a built-in input (give buffers "
                            "[[buffer(n)]]; scalars go through a constant buffer)")
        if attrs:
            edits.append((at + param.index("[["), at + len(param), ""))
        if name and "constant" in spaces and "&" in typ:  # the copy out of __constant: see docstring
            named = at + param.index(name, len(typ))
            edits.append((named, named + len(name), f"__pp_constant_{name}"))
            value = base_type(typ.replace("&", ""))
            copies.append(f"const {value} {name} = __builtin_bit_cast({value}, __pp_constant_{name}); ")
    if len(widths) > 1:
        problems.append(f"{k.where}: its position built-ins differ in width ({sorted(widths)})")
    return problems, edits, copies


def scan_threadgroup(k):
    """Problems with kernel k's threadgroup arrays, and a static_assert on their size."""
    open_brace, close_brace = k.body
    body = k.text[open_brace + 1:close_brace]
    names, problems, depth, start = [], [], 0, 0
    for j, c in enumerate(body):
        if c not in ";{}":
            continue
        statement = body[start:j].strip()
        if re.match(r"threadgroup\b", statement):
            if depth > 0 or c != ";":
                problems.append(f"{k.where}: threadgroup memory in a nested block or with an "
                                "initializer (declare it at the top of the kernel)")
            for declarator in split_top(statement):
                m = re.search(r"([*&]?)\s*(\w+)\s*(?:\[[^\]]*\]\s*)*$", split_top(declarator, "=")[0])
                if not m:
                    problems.append(f"{k.where}: a threadgroup declaration this checker cannot "
                                    f"read: {statement}")
                elif not m.group(1):  # an array or scalar, not a pointer into threadgroup memory
                    names.append(m.group(2))
        depth += (c == "{") - (c == "}")
        start = j + 1
    if not names:
        return problems, ""
    total = " + ".join(f"sizeof({n})" for n in names)
    return problems, (f' static_assert({total} <= {THREADGROUP_BYTES}, "kernel {k.name}: '
                      f'threadgroup memory over {THREADGROUP_BYTES // 1024} KB");')


def shim(text):
    """Problems the scan finds, and the text clang parses (same lines, kernels rewritten)."""
    kernels, problems = find_kernels(text)
    edits = []
    for k in kernels:
        found, param_edits, copies = scan_params(k)
        problems += found
        edits += param_edits
        found, size_check = scan_threadgroup(k)
        problems += found
        edits.append((k.start, k.attrs_end, "__kernel"))
        edits.append((k.body[0] + 1, k.body[0] + 1, " " + "".join(copies)))
        edits.append((k.body[1], k.body[1], size_check + " "))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return problems, text


DUMP_LOCATION = re.compile(r":(\d+):\d+")  # after a file name or `line`
DUMP_DECLARATION = re.compile(r"(ParmVarDecl|VarDecl|FieldDecl|TypedefDecl|TypeAliasDecl|"
                              r"NonTypeTemplateParmDecl|FunctionDecl|CXXMethodDecl|\w+CastExpr) ")


def unqualified_pointers(ast):
    """Declarations and casts outside the shim whose type is a pointer or reference without
    an address space: OpenCL's __generic, in clang's AST dump. Implicit declarations (copy
    constructors) and a method's trailing qualifier (the space of its `this`) do not count."""
    # The dump names a file (or a line) only where it changes: every location in order.
    at, files, line_nos, file = [], [], [], ""
    for m in DUMP_LOCATION.finditer(ast):
        start = max(ast.rfind(c, 0, m.start()) for c in " <,") + 1
        file = ast[start:m.start()] if ast[start:m.start()] != "line" else file
        at.append(m.start())
        files.append(file)
        line_nos.append(int(m.group(1)))
    problems, skip_below, shown, end = set(), None, {}, 0
    for line in ast.split("\n"):
        end += len(line) + 1
        node = len(line) - len(line.lstrip("|`- "))
        if skip_below is not None and node > skip_below:
            continue
        skip_below = node if " implicit " in line else None
        if skip_below is not None or "__generic" not in line:
            continue
        m = DUMP_DECLARATION.match(line, node)
        k = bisect.bisect(at, end) - 1
        if not m or m.group(1) == "ImplicitCastExpr" or k < 0 or files[k].startswith("<"):
            continue
        if files[k] not in shown:
            path = Path(files[k]).resolve()
            outside = path.is_relative_to(SHIM) or path == PRELUDE
            inside = path.is_relative_to(ROOT)
            shown[files[k]] = None if outside else path.relative_to(ROOT) if inside else path
        types = re.findall(r"'([^']*)'", line)
        if m.group(1) in ("FunctionDecl", "CXXMethodDecl"):
            types = [t[:t.find("(")] for t in types]  # the return type
        if shown[files[k]] is not None and any("__generic" in t for t in types):
            name = re.search(r"(\w+) '", line)
            problems.add(f"{shown[files[k]]}:{line_nos[k]}: {name.group(1) if name else m.group(1)} "
                         f"is a pointer or reference without an address space ('{types[0]}')")
    return sorted(problems)


def check(metal, clang=None):
    """Problems found in one .metal file, as 'file:line: message' lines."""
    clang = clang or find_clang()
    metal = Path(metal).resolve()
    pre = subprocess.run([clang, *LANGUAGE, f"-D__METAL_VERSION__={METAL_VERSION}", "-isystem",
                          str(SHIM), "-E", str(metal)], capture_output=True, text=True)
    if pre.returncode != 0:
        return [line for line in pre.stderr.splitlines() if ": error: " in line]
    problems, text = shim(pre.stdout)
    if text == pre.stdout:
        problems.append(f"{metal}: no kernel found")
    parse = subprocess.run([clang, *LANGUAGE, *PARSE, "-include", str(PRELUDE), "-"], input=text,
                           capture_output=True, text=True)
    problems += [line for line in parse.stderr.splitlines() if re.search(r": (fatal )?error: ", line)]
    problems += unqualified_pointers(parse.stdout)
    return [p.replace(str(ROOT) + "/", "") for p in problems]


def main(argv):
    clang = find_clang()
    if clang is None:
        print(f"check.py: needs clang >= {MIN_CLANG} (Debian: apt-get install clang-22)")
        return 2
    files = argv or sorted((ROOT / "kernels/metal").glob("*.metal"))
    problems = [p for f in files for p in check(f, clang)]
    print("\n".join(problems) if problems else f"{len(files)} Metal files type-check ({clang})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
