"""Read and write PyTorch `.pt` files of plain tensors, without torch and without
unpickling arbitrary code.

A `.pt` file is a zip holding `<root>/data.pkl` (a pickle) and one raw storage
per tensor in `<root>/data/<key>`. Unpickling runs whatever callables the pickle
names, so the reader resolves only the few names a tensor-only file uses
(`torch._utils._rebuild_tensor_v2`, the typed storage classes,
`collections.OrderedDict`) and refuses anything else before it can run.
The writer emits the same layout (loadable by `torch.load(weights_only=True)`),
so tiny test voices can be made without torch.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from .errors import UserError

# Storage class name -> (numpy dtype of the raw bytes, whether they are bfloat16).
_STORAGES = {
    "FloatStorage": (np.float32, False), "DoubleStorage": (np.float64, False),
    "HalfStorage": (np.float16, False), "BFloat16Storage": (np.uint16, True),
    "LongStorage": (np.int64, False), "IntStorage": (np.int32, False),
    "ShortStorage": (np.int16, False), "CharStorage": (np.int8, False),
    "ByteStorage": (np.uint8, False), "BoolStorage": (np.bool_, False),
}


class _Storage:
    def __init__(self, name: str):
        self.dtype, self.bf16 = _STORAGES[name]


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor(storage, offset, size, stride, *_):
    data, bf16, budget = storage
    item = data.itemsize
    size, stride = tuple(size), tuple(stride)
    # as_strided does not check bounds: a crafted file could otherwise read memory.
    if (len(size) != len(stride) or min(size, default=1) < 0 or min(stride, default=0) < 0
            or offset < 0 or (0 not in size and offset + sum((n - 1) * s for n, s in zip(size, stride))
                              >= len(data))):
        raise ValueError(f"tensor view {size}/{stride}+{offset} outside its storage")
    # Nor does it stop a view from repeating its storage (stride 0, overlapping rows):
    # 497 bytes on disk would become gigabytes. A view may not hold more elements than
    # its storage has past its offset.
    count = int(np.prod(size, dtype=np.int64)) if size else 1
    if count > len(data) - offset:
        raise ValueError(f"tensor view {size}/{stride}+{offset} holds {count} elements, more than "
                         f"the {len(data) - offset} of its storage (a repeating view)")
    budget.spend(count * (4 if bf16 else item))
    view = np.lib.stride_tricks.as_strided(data[offset:], shape=size,
                                           strides=tuple(s * item for s in stride))
    out = np.array(view)  # own the memory: the storage may be shared by other views
    return _bf16_to_f32(out) if bf16 else out


class _Budget:
    """Bytes a file may make its tensors and storages occupy, all together: one storage
    referenced by many views must not multiply."""

    def __init__(self, file: Path, limit: int):
        self.file, self.left, self.limit = file, limit, limit

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise UserError(f"{self.file}: holds more than {self.limit >> 20} MB of tensors; "
                            "a voice file is far smaller")


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, budget: _Budget):
        super().__init__(io.BytesIO(data))
        self.archive, self.root, self.budget, self.file = archive, root, budget, budget.file
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGES:
            return _Storage(name)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise UserError(f"{self.file}: refusing to load {module}.{name}: only plain tensors are "
                        "accepted in voice files")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _Storage)):
            raise UserError(f"{self.file}: unexpected storage reference {pid!r:.80}")
        storage, key = pid[1], str(pid[2])
        if key not in self.storages:
            raw = _read(self.archive, f"{self.root}/data/{key}", self.budget)
            self.storages[key] = np.frombuffer(raw, dtype=storage.dtype)
        return self.storages[key], storage.bf16, self.budget


def _read(archive: zipfile.ZipFile, name: str, budget: _Budget) -> bytes:
    # The size in the zip's directory is checked before inflating (a deflated member
    # could be a bomb); the read stops at that size whatever the stream holds.
    budget.spend(archive.getinfo(name).file_size)
    with archive.open(name) as f:
        return f.read(archive.getinfo(name).file_size)


# A voice is at most ~750 frames x 4096 float32 (12 MB); the limit leaves room for
# larger models' widths while keeping what a crafted file can cost bounded.
MAX_BYTES = 64 << 20


def load(path: str | Path, max_bytes: int = MAX_BYTES) -> object:
    """The pickled object of a tensor-only `.pt` file, tensors as numpy arrays
    (bfloat16 widened to float32); at most `max_bytes` of storages and tensors."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise UserError(f"{path}: not a PyTorch zip checkpoint (no data.pkl)")
            root = pkl[0][: -len("/data.pkl")]
            budget = _Budget(path, max_bytes)
            if f"{root}/byteorder" in archive.namelist() and \
                    _read(archive, f"{root}/byteorder", budget).strip() != b"little":
                raise UserError(f"{path}: big-endian PyTorch file; re-save it on a little-endian machine")
            return _Unpickler(_read(archive, pkl[0], budget), archive, root, budget).load()
    except RecursionError:
        raise UserError(f"{path}: cannot read PyTorch file (nested too deeply)") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, pickle.UnpicklingError, TypeError,
            ValueError, AttributeError, IndexError, OverflowError, MemoryError) as e:
        raise UserError(f"{path}: cannot read PyTorch file ({e})") from None


# ----------------------------------------------------------------------- writer


def _op(code: bytes, *parts: bytes) -> bytes:
    return code + b"".join(parts)


def _str(s: str) -> bytes:
    b = s.encode()
    return _op(b"X", struct.pack("<I", len(b)), b)


def _int(v: int) -> bytes:
    return _op(b"J", struct.pack("<i", v))


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


_DTYPE_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage",
                  np.dtype(np.int32): "IntStorage", np.dtype(np.float16): "HalfStorage"}


def save(path: str | Path, tensors: dict[str, np.ndarray], bf16: tuple[str, ...] = ()) -> None:
    """Write {name: array} as a PyTorch `.pt` file; names in `bf16` are stored as bfloat16."""
    root = Path(path).stem
    body, storages = [], []
    for key, (name, arr) in enumerate(tensors.items()):
        arr = np.ascontiguousarray(arr)
        if name in bf16:
            bits = arr.astype(np.float32).view(np.uint32).astype(np.uint64)
            raw = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
            storage = "BFloat16Storage"
        else:
            raw, storage = arr, _DTYPE_STORAGE[arr.dtype]
        storages.append(raw.tobytes())
        strides = [int(s // arr.itemsize) for s in arr.strides] if arr.ndim else []
        pid = _tuple([_str("storage"), b"ctorch\n" + storage.encode() + b"\n", _str(str(key)),
                      _str("cpu"), _int(arr.size)]) + b"Q"
        hooks = b"ccollections\nOrderedDict\n)R"
        args = _tuple([pid, _int(0), _tuple([_int(d) for d in arr.shape]),
                       _tuple([_int(s) for s in strides]), b"\x89", hooks])
        body.append(_str(name) + b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R")
    pkl = b"\x80\x02}(" + b"".join(body) + b"u."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{root}/data.pkl", pkl)
        z.writestr(f"{root}/byteorder", "little")
        for key, raw in enumerate(storages):
            z.writestr(f"{root}/data/{key}", raw)
        z.writestr(f"{root}/version", "3\n")
