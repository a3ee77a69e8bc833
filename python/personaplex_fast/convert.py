"""`convert`: an official checkpoint -> an MLX-ready directory.

The output holds the weights under our own key names (attention projections
already split per step), optionally quantized in MLX's affine layout, so
loading is a straight read with no re-layout; the codec, tokenizer and voices
are carried along unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tqdm import tqdm

from .checkpoint import CONVERTED_KEY, load_lm, model_files, quantizable, resolve
from .config import CONFIG, LM_WEIGHTS, MIMI_WEIGHTS, TEXT_TOKENIZER
from .errors import CheckpointError

# Carried along, under the official names (the converted config.json names no others).
CARRIED = ("voices.tgz", "dist.tgz", "mimi_config.json", "tokenizer.model")


def unquantized(model: nn.Module, group_size: int) -> list[str]:
    """The linear layers `convert` leaves unquantized, as name patterns (layer and step
    numbers as *) with their count and input width."""
    found = Counter()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not quantizable(group_size)(name, module):
            found[re.sub(r"\.\d+(?=\.|$)", ".*", name), module.weight.shape[-1]] += 1
    return [f"{name} ({count} of width {width})" for (name, width), count in sorted(found.items())]


def convert(source: str | Path, dest: str | Path, q_bits: int | None = None,
            group_size: int = 64, dtype: mx.Dtype | None = None) -> Path:
    if q_bits not in (None, 4, 8):
        raise CheckpointError(f"--q-bits must be 4 or 8, got {q_bits}")
    dest = Path(dest)
    src_dir = resolve(source, optional=(CONFIG, "mimi", "tokenizer", *CARRIED))
    files = model_files(src_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CheckpointError(f"{dest}: destination exists and is not empty (or not a folder); remove it or choose another")
    parent = next(p for p in dest.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise CheckpointError(f"{dest}: cannot create it ({parent} is not a writable folder)")
    model = load_lm(source, dtype=dtype)  # fails on bad input before any output is made
    # disable=None: a bar on a terminal, nothing when stderr is a pipe or a log.
    steps = tqdm(total=4, initial=1, desc="convert", unit="step", disable=None)
    if q_bits:
        kept = unquantized(model, group_size)
        nn.quantize(model, group_size=group_size, bits=q_bits, class_predicate=quantizable(group_size))
        steps.write(f"convert: linear layers quantized to {q_bits} bits in groups of {group_size}"
                    + (f"; kept at full precision, their input width not a multiple of {group_size}: "
                       + ", ".join(kept) if kept else "; every linear layer quantized")
                    + " (embeddings and norms are never quantized)", file=sys.stdout)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    steps.update()
    tmp = dest.with_name(dest.name + ".partial")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mx.save_safetensors(str(tmp / LM_WEIGHTS), weights, metadata={"format": "mlx"})
        config = model.cfg.to_dict()
        config[CONVERTED_KEY] = {
            "format": 1,
            "quantization": {"bits": q_bits, "group_size": group_size} if q_bits else None,
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        steps.update()
        for src, dst in ((files.mimi, MIMI_WEIGHTS), (files.tokenizer, TEXT_TOKENIZER), *((n, n) for n in CARRIED)):
            if (src_dir / src).exists():
                shutil.copy2(src_dir / src, tmp / dst)
        # Written aside and moved into place last, so an interrupted run never leaves
        # a directory that looks complete.
        if dest.exists():
            dest.rmdir()
        tmp.rename(dest)
    except (OSError, RuntimeError) as e:  # RuntimeError: MLX's save_safetensors
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{dest}: cannot write the converted model ({e.strerror or e})") from None
    steps.update()
    steps.close()
    return dest
