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
    data, bf16 = storage
    item = data.itemsize
    # as_strided does not check bounds: a crafted file could otherwise read memory.
    if (len(size) != len(stride) or min(size, default=1) < 0 or min(stride, default=0) < 0
            or offset < 0 or (0 not in size and offset + sum((n - 1) * s for n, s in zip(size, stride))
                              >= len(data))):
        raise ValueError(f"tensor view {tuple(size)}/{tuple(stride)}+{offset} outside its storage")
    view = np.lib.stride_tricks.as_strided(data[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride))
    out = np.array(view)  # own the memory: the storage may be shared by other views
    return _bf16_to_f32(out) if bf16 else out


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, file: Path):
        super().__init__(io.BytesIO(data))
        self.archive, self.root, self.file = archive, root, file

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
        storage, key = pid[1], pid[2]
        raw = self.archive.read(f"{self.root}/data/{key}")
        return np.frombuffer(raw, dtype=storage.dtype), storage.bf16


def load(path: str | Path) -> object:
    """The pickled object of a tensor-only `.pt` file, tensors as numpy arrays
    (bfloat16 widened to float32)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise UserError(f"{path}: not a PyTorch zip checkpoint (no data.pkl)")
            root = pkl[0][: -len("/data.pkl")]
            if f"{root}/byteorder" in archive.namelist() and \
                    archive.read(f"{root}/byteorder").strip() != b"little":
                raise UserError(f"{path}: big-endian PyTorch file; re-save it on a little-endian machine")
            return _Unpickler(archive.read(pkl[0]), archive, root, path).load()
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, pickle.UnpicklingError, TypeError,
            ValueError, AttributeError, IndexError) as e:
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
