"""Loading LM checkpoints: official PyTorch safetensors or our converted directories.

A model source is a local directory (official layout or `convert` output), a
local `.safetensors` file, or a Hugging Face repo name such as
`nvidia/personaplex-7b-v1`. Official key names are mapped onto ours here and
nowhere else; every mismatch is reported by key and file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import CONFIG, LMConfig, ModelFiles
from .errors import CheckpointError
from .models.lm import LM

# Written into config.json by `convert`; its presence means keys are already ours.
CONVERTED_KEY = "personaplex_fast"
_HF_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ATTN = re.compile(r"^(transformer|depformer)\.layers\.(\d+)\.self_attn\."
                   r"(in_proj_weight|in_proj\.weight|out_proj\.weight)$")
# Per-codebook-step groups: a checkpoint may carry more depformer steps than we
# run (PersonaPlex's generator was built with 16); the extra ones are unused.
_STEP_KEYS = [
    (re.compile(r"^depformer\.layers\.\d+\.gating\.(\d+)\."), 0),
    (re.compile(r"^depformer\.layers\.\d+\.self_attn\.(?:in|out)_projs\.(\d+)\."), 0),
    (re.compile(r"^linears\.(\d+)\."), 0),
    (re.compile(r"^depformer_in\.(\d+)\."), 0),
    (re.compile(r"^depformer_emb\.(\d+)\."), 1),
]


def is_hf_name(source: str) -> bool:
    return not Path(source).exists() and bool(_HF_NAME.match(source))


def resolve(source: str | Path, roles: tuple[str, ...] = ("lm",), optional: tuple[str, ...] = ()) -> Path:
    """A local directory holding the files of `roles` (ModelFiles' fields: "lm", "mimi",
    "tokenizer") and, when available, those of `optional` (roles or plain file names).

    Hugging Face names are downloaded (with progress bars) into the HF cache: config.json
    first, for the file names it may give."""
    source = str(source)
    path = Path(source).expanduser()
    if path.exists():
        return path.parent if path.is_file() else path
    if not _HF_NAME.match(source):
        raise CheckpointError(f"{source}: no such file or directory (and not a Hugging Face repo name)")
    from .hub import download

    snapshot = download(source, (), optional=(CONFIG,))
    files = model_files(snapshot) if snapshot is not None else ModelFiles()
    name = lambda r: getattr(files, r, r)  # noqa: E731
    found = download(source, tuple(map(name, roles)), tuple(map(name, optional)))
    if found is None and snapshot is None:
        raise CheckpointError(f"{source}: none of its files are in the local Hugging Face cache")
    return found or snapshot


def model_files(directory: Path) -> ModelFiles:
    """The model's file names, from its config.json (official names without one)."""
    file = directory / CONFIG
    if not file.is_file():
        return ModelFiles()
    try:
        raw = json.loads(file.read_text())
        return ModelFiles.from_dict(raw if isinstance(raw, dict) else {})
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None


def read_config(directory: Path) -> tuple[LMConfig, dict]:
    file = directory / CONFIG
    raw = {}
    if file.exists():
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file}: not valid JSON ({e.msg}, line {e.lineno})") from None
    try:
        return LMConfig.load(directory), raw
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def _weights_file(source: Path) -> Path:
    if source.is_file():
        return source
    name = model_files(source).lm
    file = source / name
    if not file.exists():
        raise CheckpointError(f"{source}: no {name} in this directory")
    return file


def load_weights(file: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(file))
    except Exception as e:  # mlx raises plain exceptions for unreadable files
        raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None


def from_official(weights: dict[str, mx.array], cfg: LMConfig, file: Path) -> dict[str, mx.array]:
    """Official key names -> ours: split stacked attention projections per step,
    drop depformer steps beyond dep_q."""
    out = {}
    d = cfg.depformer
    for key, w in weights.items():
        m = _ATTN.match(key)
        if m is None:
            out[key] = w
            continue
        part, layer, name = m.groups()
        dim = cfg.dim if part == "transformer" else d.dim
        rows = 3 * dim if name.startswith("in_proj") else dim
        steps_we_run = cfg.dep_q if part == "depformer" and d.weights_per_step else 1
        if w.ndim != 2 or w.shape[0] % rows or w.shape[0] // rows < steps_we_run:
            raise CheckpointError(
                f"{file}: {key} has shape {tuple(w.shape)}, expected ({steps_we_run * rows}, {dim})")
        kind = "in_projs" if name.startswith("in_proj") else "out_projs"
        for s in range(w.shape[0] // rows):
            out[f"{part}.layers.{layer}.self_attn.{kind}.{s}.weight"] = w[s * rows:(s + 1) * rows]
    if d.weights_per_step:
        out = {k: v for k, v in out.items() if not _extra_step(k, cfg.dep_q)}
    return out


def _extra_step(key: str, dep_q: int) -> bool:
    for pattern, shift in _STEP_KEYS:
        m = pattern.match(key)
        if m:
            return int(m.group(1)) + shift >= dep_q
    return False


def to_official(params: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our key names -> official ones (stacked per-step attention projections)."""
    out, stacks = {}, {}
    for key, w in params.items():
        m = re.match(r"^(.*\.self_attn)\.(in|out)_projs\.(\d+)\.weight$", key)
        if m is None:
            out[key] = w
            continue
        name = f"{m.group(1)}.in_proj_weight" if m.group(2) == "in" else f"{m.group(1)}.out_proj.weight"
        stacks.setdefault(name, {})[int(m.group(3))] = w
    for name, parts in stacks.items():
        # One part (the temporal layers'): no copy, which would hold 4.3 GB more at 7B.
        ordered = [parts[i] for i in sorted(parts)]
        out[name] = ordered[0] if len(ordered) == 1 else mx.concatenate(ordered, axis=0)
    return out


def check_keys(model: nn.Module, weights: dict[str, mx.array], file: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{file}: missing key {missing[0]}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{file}: unexpected key {unexpected[0]}{more}")
    for key, w in weights.items():
        if tuple(w.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{file}: {key} has shape {tuple(w.shape)}, expected {tuple(expected[key].shape)}")


def device_memory() -> int:
    """Bytes of memory the default device has (the GPU's own, or this machine's RAM)."""
    import os

    info = mx.device_info()
    if "memory_size" in info:
        return int(info["memory_size"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_device_memory() -> int:
    """Bytes still free for new buffers: on a GPU its memory less what MLX holds (the
    loaded weights), on the CPU this machine's available memory (MemAvailable)."""
    info = mx.device_info()
    if mx.default_device() == mx.gpu and "memory_size" in info:
        return max(0, int(info["memory_size"]) - mx.get_active_memory())
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return max(0, device_memory() - mx.get_active_memory())


def check_fits(cfg: LMConfig, file: Path, config: Path, sessions: int = 1) -> None:
    """Refuse, before anything is built, a config.json that the weights file cannot hold
    (num_layers 1e6 would otherwise build a million layers) or whose weights and KV
    cache for `sessions` sessions exceed the device's memory. Lower bounds: 4-bit
    weights (convert --q-bits 4), a bfloat16 cache."""
    params = cfg.parameter_count()
    if config.exists() and file.exists() and params // 2 > file.stat().st_size:
        raise CheckpointError(f"{config}: describes {params:,} parameters, more than {file.name} "
                              f"({file.stat().st_size:,} bytes) can hold; the config belongs to another model")
    need, have = params // 2 + cfg.kv_bytes(sessions), device_memory()
    if need > have:
        raise CheckpointError(f"{config}: needs at least {need / 2**30:.1f} GiB (weights and the "
                              f"{cfg.context}-frame KV cache of {sessions} session(s)); this device has "
                              f"{have / 2**30:.1f} GiB")


def quantizable(group_size: int):
    """Which layers `convert` quantizes: linears whose input width the group divides."""

    def predicate(path: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0

    return predicate


def load_lm(source: str | Path, dtype: mx.Dtype | None = None) -> LM:
    """Build the LM from any supported source, checking every key and shape."""
    directory = resolve(source)
    path = Path(source).expanduser()
    file = _weights_file(path if path.is_file() else directory)
    cfg, raw = read_config(directory)
    check_fits(cfg, file, directory / CONFIG)
    model = LM(cfg)
    weights = load_weights(file)
    converted = raw.get(CONVERTED_KEY)
    if converted:
        q = converted.get("quantization")
        if q:
            nn.quantize(model, group_size=q["group_size"], bits=q["bits"],
                        class_predicate=quantizable(q["group_size"]))
    else:
        weights = from_official(weights, cfg, file)
    check_keys(model, weights, file)
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    _materialize(model, file)
    return model


def _materialize(model: nn.Module, file: Path) -> None:
    """Read the weights in (mx.load maps them lazily), a tensor at a time, with a bar on
    a terminal (disable=None: nothing in a log or a pipe): 16 GB take a while."""
    from tqdm import tqdm

    params = [w for _, w in tree_flatten(model.parameters())]
    with tqdm(total=sum(w.nbytes for w in params), desc=f"load {file.name}", unit="B", unit_scale=True,
              disable=None, leave=False) as bar:
        for w in params:
            mx.eval(w)
            bar.update(w.nbytes)
