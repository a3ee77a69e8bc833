"""Official Mimi safetensors <-> `models.mimi.Mimi`, by an explicit key map.

The official file (`tokenizer-e351c8d8-checkpoint125.safetensors`) uses moshi's
`MimiModel.state_dict()` names with weight-norm already folded in (norm 'none'), e.g.
`encoder.model.3.conv.conv.weight`. Attention projections appear either as moshi saves
them today (`self_attn.in_projs.0.weight`) or as the released file spells them
(`self_attn.in_proj_weight`, `self_attn.out_proj.weight`); both are accepted.

Strict: a missing, unexpected or mis-shaped key raises `CheckpointError` naming the key
and the file. Codebooks stored beyond `num_codebooks` (the official file holds 32,
PersonaPlex uses 8) are shape-checked and skipped.

`write_tiny_mimi` writes a small random checkpoint in the same format, with its
`MimiConfig` as JSON in the safetensors metadata; `load_mimi` reads the config from there
and otherwise assumes the official one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

from .config import MimiConfig, MimiTransformerConfig, QuantizerConfig, SeanetConfig
from .errors import CheckpointError
from .models.mimi import Mimi

CONFIG_METADATA_KEY = "personaplex_fast.mimi_config"


@dataclass(frozen=True)
class Tensor:
    key: str  # official name
    shape: tuple[int, ...]  # official shape
    target: str | None  # our parameter path; None: expected in the file but unused
    convert: Callable[[mx.array], mx.array] = lambda w: w
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class CodebookTensors:
    """embedding_sum / max(cluster_usage, eps) -> one centroid table."""
    prefix: str  # e.g. "quantizer.rvq_first.vq.layers.0._codebook."
    bins: int
    dim: int
    target: str | None


def _conv(key, target, c_in, c_out, k, bias=True):
    # PyTorch conv [C_out, C_in, K] -> MLX [C_out, K, C_in]
    out = [Tensor(key + ".weight", (c_out, c_in, k), target + ".weight",
                  lambda w: w.transpose(0, 2, 1))]
    return out + ([Tensor(key + ".bias", (c_out,), target + ".bias")] if bias else [])


def _convtr(key, target, c_in, c_out, k, groups=1, bias=True):
    # PyTorch [C_in, C_out/g, K] -> MLX [C_out, K, C_in/g], group by group.
    def convert(w):
        w = w.reshape(groups, c_in // groups, c_out // groups, k)
        return w.transpose(0, 2, 3, 1).reshape(c_out, k, c_in // groups)
    out = [Tensor(key + ".weight", (c_in, c_out // groups, k), target + ".weight", convert)]
    return out + ([Tensor(key + ".bias", (c_out,), target + ".bias")] if bias else [])


def _residual(key, target, cfg: SeanetConfig, dim, j):
    return (_conv(f"{key}.block.1.conv.conv", f"{target}.conv1", dim, dim // cfg.compress,
                  cfg.residual_kernel_size)
            + _conv(f"{key}.block.3.conv.conv", f"{target}.conv2", dim // cfg.compress, dim, 1))


def _seanet_encoder(cfg: SeanetConfig):
    out = _conv("encoder.model.0.conv.conv", "encoder.input_conv", cfg.channels, cfg.n_filters,
                cfg.kernel_size)
    idx, width = 1, cfg.n_filters
    for i, ratio in enumerate(reversed(cfg.ratios)):
        for j in range(cfg.n_residual_layers):
            out += _residual(f"encoder.model.{idx}", f"encoder.residuals.{i}.{j}", cfg, width, j)
            idx += 1
        idx += 1  # ELU
        out += _conv(f"encoder.model.{idx}.conv.conv", f"encoder.downsamples.{i}", width,
                     2 * width, 2 * ratio)
        idx, width = idx + 1, 2 * width
    return out + _conv(f"encoder.model.{idx + 1}.conv.conv", "encoder.output_conv", width,
                       cfg.dimension, cfg.last_kernel_size)


def _seanet_decoder(cfg: SeanetConfig):
    width = cfg.n_filters * 2 ** len(cfg.ratios)
    out = _conv("decoder.model.0.conv.conv", "decoder.input_conv", cfg.dimension, width,
                cfg.kernel_size)
    idx = 1
    for i, ratio in enumerate(cfg.ratios):
        idx += 1  # ELU
        out += _convtr(f"decoder.model.{idx}.convtr.convtr", f"decoder.upsamples.{i}", width,
                       width // 2, 2 * ratio)
        idx, width = idx + 1, width // 2
        for j in range(cfg.n_residual_layers):
            out += _residual(f"decoder.model.{idx}", f"decoder.residuals.{i}.{j}", cfg, width, j)
            idx += 1
    return out + _conv(f"decoder.model.{idx + 1}.conv.conv", "decoder.output_conv", width,
                       cfg.channels, cfg.last_kernel_size)


def _transformer(side: str, cfg: MimiTransformerConfig):
    d, f, out = cfg.d_model, cfg.dim_feedforward, []
    for i in range(cfg.num_layers):
        key, tgt = f"{side}_transformer.transformer.layers.{i}", f"{side}_transformer.layers.{i}"
        out += [
            Tensor(f"{key}.self_attn.in_proj_weight", (3 * d, d), f"{tgt}.in_proj.weight",
                   aliases=(f"{key}.self_attn.in_projs.0.weight",)),
            Tensor(f"{key}.self_attn.out_proj.weight", (d, d), f"{tgt}.out_proj.weight",
                   aliases=(f"{key}.self_attn.out_projs.0.weight",)),
            Tensor(f"{key}.norm1.weight", (d,), f"{tgt}.attn_norm.weight"),
            Tensor(f"{key}.norm1.bias", (d,), f"{tgt}.attn_norm.bias"),
            Tensor(f"{key}.norm2.weight", (d,), f"{tgt}.ffn_norm.weight"),
            Tensor(f"{key}.norm2.bias", (d,), f"{tgt}.ffn_norm.bias"),
            Tensor(f"{key}.linear1.weight", (f, d), f"{tgt}.ffn_in.weight"),
            Tensor(f"{key}.linear2.weight", (d, f), f"{tgt}.ffn_out.weight"),
            Tensor(f"{key}.layer_scale_1.scale", (d,), f"{tgt}.attn_scale"),
            Tensor(f"{key}.layer_scale_2.scale", (d,), f"{tgt}.ffn_scale"),
        ]
    return out


def _quantizer(cfg: MimiConfig):
    q, dim = cfg.quantizer, cfg.seanet.dimension
    tensors, books = [], []
    for name, ours, first, n_stored in (("rvq_first", "semantic", 0, q.n_q_semantic),
                                        ("rvq_rest", "acoustic", q.n_q_semantic, q.n_q - q.n_q_semantic)):
        key = f"quantizer.{name}"
        squeeze = lambda w: w[:, :, 0]  # 1x1 conv -> linear
        tensors += [
            Tensor(f"{key}.input_proj.weight", (q.dimension, dim, 1),
                   f"quantizer.{ours}.input_proj.weight", squeeze),
            Tensor(f"{key}.output_proj.weight", (dim, q.dimension, 1),
                   f"quantizer.{ours}.output_proj.weight", squeeze),
        ]
        for i in range(n_stored):
            used = first + i < cfg.num_codebooks
            books.append(CodebookTensors(f"{key}.vq.layers.{i}._codebook.", q.bins, q.dimension,
                                         f"quantizer.{ours}.codebooks.{i}.embedding" if used else None))
    return tensors, books


def official_layout(cfg: MimiConfig) -> tuple[list[Tensor], list[CodebookTensors]]:
    """Every tensor of an official Mimi checkpoint for `cfg`, with where it goes in ours."""
    s, stride = cfg.seanet, cfg.resample_stride
    tensors = _seanet_encoder(s) + _seanet_decoder(s)
    tensors += _transformer("encoder", cfg.transformer) + _transformer("decoder", cfg.transformer)
    q_tensors, books = _quantizer(cfg)
    tensors += q_tensors
    tensors += _conv("downsample.conv.conv.conv", "downsample", s.dimension, s.dimension,
                     2 * stride, bias=False)
    tensors += _convtr("upsample.convtr.convtr.convtr", "upsample", s.dimension, s.dimension,
                       2 * stride, groups=s.dimension, bias=False)
    return tensors, books


def _codebook_keys(book: CodebookTensors):
    p = book.prefix
    return {p + "embedding_sum": (book.bins, book.dim), p + "cluster_usage": (book.bins,),
            p + "_initialized": (1,)}


def load_mimi(path: str | Path, config: MimiConfig | None = None,
              dtype: mx.Dtype = mx.float32) -> Mimi:
    """Build a `Mimi` from an official-format safetensors file (see module docstring)."""
    path = Path(path)
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:  # missing file, not safetensors, truncated
        raise CheckpointError(f"cannot read Mimi checkpoint {path}: {e}") from None
    if config is None:
        meta = (metadata or {}).get(CONFIG_METADATA_KEY)
        config = MimiConfig.from_dict(json.loads(meta)) if meta else MimiConfig()
    tensors, books = official_layout(config)

    remaining = dict(weights)

    def take(key: str, shape: tuple, aliases=()) -> mx.array:
        found = [k for k in (key, *aliases) if k in remaining]
        if not found:
            raise CheckpointError(f"{path}: missing key '{key}' (shape {shape}) for this Mimi config")
        if len(found) > 1:
            raise CheckpointError(f"{path}: key '{found[1]}' duplicates '{found[0]}'")
        value = remaining.pop(found[0])
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(f"{path}: key '{found[0]}' has shape {tuple(value.shape)}, "
                                  f"expected {tuple(shape)} for this Mimi config")
        return value

    ours: list[tuple[str, mx.array]] = []
    for t in tensors:
        value = take(t.key, t.shape, t.aliases)
        if t.target is not None:
            ours.append((t.target, t.convert(value.astype(mx.float32)).astype(dtype)))
    for book in books:
        got = {k: take(k, shape) for k, shape in _codebook_keys(book).items()}
        if book.target is not None:
            usage = got[book.prefix + "cluster_usage"].astype(mx.float32)
            usage = mx.maximum(usage, config.quantizer.epsilon)
            table = got[book.prefix + "embedding_sum"].astype(mx.float32) / usage[:, None]
            ours.append((book.target, table.astype(dtype)))
    if remaining:
        key = sorted(remaining)[0]
        raise CheckpointError(f"{path}: unexpected key '{key}' (and {len(remaining) - 1} more) "
                              "for this Mimi config")

    model = Mimi(config)
    model.update(tree_unflatten(ours))
    mx.eval(model.parameters())
    return model


# ----------------------------------------------------------------------- tiny writer


def tiny_mimi_config() -> MimiConfig:
    """Same frame (1920 samples at 24 kHz, ratios 8,6,5,4) and 8 codebooks, tiny widths
    (attention heads of 16: a head dim the GPU kernels take, so the tick program runs there)."""
    return MimiConfig(
        seanet=SeanetConfig(dimension=32, n_filters=4),
        transformer=MimiTransformerConfig(d_model=32, num_heads=2, num_layers=2, dim_feedforward=64,
                                          context=16),
        quantizer=QuantizerConfig(dimension=16, bins=64, n_q=8))


def write_tiny_mimi(path: str | Path, config: MimiConfig | None = None, seed: int = 0) -> MimiConfig:
    """Write a random Mimi checkpoint in the official key format; returns its config.

    Weights are scaled by 1/sqrt(fan_in) so activations stay O(1) through the SEANet, and
    codebook centroids are distinct Gaussians at the scale of the projected latent, so the
    codes of real audio vary rather than collapse to one index.
    """
    config = config or tiny_mimi_config()
    rng = np.random.default_rng(seed)
    tensors, books = official_layout(config)
    out: dict[str, np.ndarray] = {}
    for t in tensors:
        if t.key.endswith(".bias"):
            value = 0.02 * rng.standard_normal(t.shape)
        elif "norm" in t.key.rsplit(".", 2)[-2] and t.key.endswith("weight"):
            value = 1.0 + 0.1 * rng.standard_normal(t.shape)
        elif t.key.endswith(".scale"):
            value = config.transformer.layer_scale * (1 + 0.1 * rng.standard_normal(t.shape))
        else:
            fan_in = int(np.prod(t.shape[1:]))
            if ".convtr." in t.key:  # each output sums K/stride = 2 taps per input channel
                fan_in = 2 if t.shape[1] == 1 else 2 * t.shape[0]
            value = rng.standard_normal(t.shape) / np.sqrt(max(fan_in, 1))
        out[t.key] = value.astype(np.float32)
    for i, book in enumerate(books):
        # Residual codebooks see ever smaller residuals; shrink their spread to match.
        scale = 0.5 * 0.7 ** (0 if "rvq_first" in book.prefix else i - config.quantizer.n_q_semantic)
        usage = rng.uniform(0.5, 2.0, book.bins).astype(np.float32)
        table = scale * rng.standard_normal((book.bins, book.dim)).astype(np.float32)
        out[book.prefix + "embedding_sum"] = table * usage[:, None]
        out[book.prefix + "cluster_usage"] = usage
        out[book.prefix + "_initialized"] = np.ones((1,), np.float32)
    from safetensors.numpy import save_file
    save_file(out, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(config.to_dict())})
    return config
