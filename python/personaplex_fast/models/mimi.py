"""Mimi, Kyutai's streaming neural audio codec (arXiv:2410.00037), in pure MLX.

    24 kHz pcm -> SEANet encoder (hop 960, 25 Hz) -> transformer -> strided conv (12.5 Hz)
               -> split RVQ (1 semantic + 7 acoustic codebooks) -> codes [B, 8] per frame
    codes -> RVQ embeddings -> transposed conv (25 Hz) -> transformer -> SEANet decoder -> pcm

One frame is 1920 samples (80 ms). The streaming API keeps all history in an explicit
`MimiState` per direction, holding a batch of B independent sessions:

    state = mimi.new_encoder_state(B);  codes = mimi.encode_step(frame, state)   # [B,1920]->[B,8]
    state = mimi.new_decoder_state(B);  pcm = mimi.decode_step(codes, state)     # [B,8]->[B,1920]

`encode`/`decode` run a whole clip as one step from a fresh state, so streaming a clip
frame by frame gives the same codes and audio as the whole clip, up to float summation
order (tests/test_mimi.py checks both). Both equal moshi's *streaming* mode frame by frame
(tests/test_mimi_parity.py); moshi's own whole-clip mode differs slightly once the
attention window fills, because its ring cache drops a frame's oldest key early. Parameters default to fp32; `mimi.set_dtype(
mx.bfloat16)` works, with codebook distances kept in fp32.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from .. import ops
from .mimi_layers import (CausalConv1d, CausalConvTranspose1d, SeanetDecoder, SeanetEncoder,
                          Transformer)


@dataclass(frozen=True)
class SeanetConfig:
    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder runs them reversed
    n_residual_layers: int = 1
    compress: int = 2
    dilation_base: int = 2
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3


@dataclass(frozen=True)
class MimiTransformerConfig:
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250  # steps of 40 ms (the transformers run at the 25 Hz encoder rate)
    layer_scale: float = 0.01
    max_period: float = 10000.0
    norm_eps: float = 1e-5


@dataclass(frozen=True)
class QuantizerConfig:
    dimension: int = 256
    bins: int = 2048
    n_q: int = 32  # codebooks stored in the checkpoint
    n_q_semantic: int = 1
    epsilon: float = 1e-5  # floor of cluster_usage when turning EMA sums into centroids


@dataclass(frozen=True)
class MimiConfig:
    """Defaults are the official Mimi (tokenizer-e351c8d8-checkpoint125) as PersonaPlex uses it."""

    sample_rate: int = 24000
    frame_rate: float = 12.5
    num_codebooks: int = 8  # codebooks used: PersonaPlex/Moshi model 8 of the 32 stored
    seanet: SeanetConfig = field(default_factory=SeanetConfig)
    transformer: MimiTransformerConfig = field(default_factory=MimiTransformerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    @property
    def frame_size(self) -> int:
        return int(self.sample_rate / self.frame_rate)

    @property
    def hop_length(self) -> int:
        return math.prod(self.seanet.ratios)

    @property
    def resample_stride(self) -> int:
        """Encoder-rate steps per codec frame (2: 25 Hz -> 12.5 Hz)."""
        return self.frame_size // self.hop_length

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "MimiConfig":
        seanet = dict(d.get("seanet", {}))
        if "ratios" in seanet:
            seanet["ratios"] = tuple(seanet["ratios"])
        return MimiConfig(
            **{k: v for k, v in d.items() if k not in ("seanet", "transformer", "quantizer")},
            seanet=SeanetConfig(**seanet),
            transformer=MimiTransformerConfig(**d.get("transformer", {})),
            quantizer=QuantizerConfig(**d.get("quantizer", {})))


# --------------------------------------------------------------------------- quantizer


class Codebook(nn.Module):
    """Euclidean codebook; `embedding` is the checkpoint's embedding_sum / cluster_usage."""

    def __init__(self, bins: int, dim: int):
        super().__init__()
        self.embedding = mx.zeros((bins, dim))


class ResidualVQ(nn.Module):
    """Projection 512 -> 256, residual nearest-neighbour over `n` codebooks, projection back."""

    def __init__(self, cfg: MimiConfig, n: int):
        super().__init__()
        q = cfg.quantizer
        self.input_proj = nn.Linear(cfg.seanet.dimension, q.dimension, bias=False)
        self.output_proj = nn.Linear(q.dimension, cfg.seanet.dimension, bias=False)
        self.codebooks = [Codebook(q.bins, q.dimension) for _ in range(n)]
        # Not an array attribute, so not a parameter: the stacked tables and their sources.
        self._stack = types.SimpleNamespace(sources=(), tables=None)

    def tables(self) -> mx.array:
        """[n, bins, dim] float32 (distances stay fp32 even for bf16 weights: near-ties would
        otherwise flip codes); rebuilt only when a codebook's embedding is replaced."""
        sources = tuple(book.embedding for book in self.codebooks)
        if len(sources) != len(self._stack.sources) or any(
                a is not b for a, b in zip(sources, self._stack.sources)):
            self._stack.sources = sources
            self._stack.tables = mx.stack(sources).astype(mx.float32)
        return self._stack.tables

    def encode(self, x: mx.array) -> mx.array:
        return ops.rvq_encode(self.input_proj(x), self.tables())

    def decode(self, codes: mx.array, chunk_frames: int = 125) -> mx.array:
        total = ops.rvq_decode(codes, self.tables())
        return self.output_proj(total.astype(self.output_proj.weight.dtype))


class SplitResidualVQ(nn.Module):
    """Semantic and acoustic RVQs both read the same latent; their outputs are summed."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        n_sem = cfg.quantizer.n_q_semantic
        self.n_semantic = n_sem
        self.semantic = ResidualVQ(cfg, n_sem)
        self.acoustic = ResidualVQ(cfg, cfg.num_codebooks - n_sem)

    def encode(self, x: mx.array) -> mx.array:
        return mx.concatenate([self.semantic.encode(x), self.acoustic.encode(x)], axis=-1)

    def decode(self, codes: mx.array, chunk_frames: int = 125) -> mx.array:
        n = self.n_semantic
        return self.semantic.decode(codes[..., :n]) + self.acoustic.decode(codes[..., n:])


# ------------------------------------------------------------------------------- state


class MimiState:
    """Streaming state of one direction (encode or decode) for a batch of sessions."""

    def __init__(self, batch: int, convs: list, transformer):
        self.batch = batch
        self.convs = convs  # ConvCache / ConvTrCache per conv, in execution order
        self.transformer = transformer  # TransformerCache

    def reset(self, session: int | None = None) -> None:
        """Forget the history of one session (index) or of all of them (None)."""
        mask = mx.ones((self.batch,), dtype=mx.bool_)
        if session is not None:
            mask = mx.arange(self.batch) == session
        for cache in self.convs:
            cache.reset(mask)
        self.transformer.reset(mask)

    def arrays(self) -> list:
        """Every array of the state, e.g. to `mx.eval` after a step so graphs stay short."""
        out = [self.transformer.offset]
        for kv in self.transformer.layers:
            out += [kv.keys, kv.values, kv.positions]
        for c in self.convs:
            out += [c.previous, c.first] if hasattr(c, "previous") else [c.partial]
        return out


# ------------------------------------------------------------------------------- model


class Mimi(nn.Module):
    def __init__(self, cfg: MimiConfig = MimiConfig()):
        super().__init__()
        if cfg.frame_size % cfg.hop_length:
            raise ValueError(f"frame size {cfg.frame_size} is not a multiple of hop {cfg.hop_length}")
        if cfg.transformer.d_model != cfg.seanet.dimension:
            raise ValueError(f"transformer d_model {cfg.transformer.d_model} must equal the SEANet "
                             f"dimension {cfg.seanet.dimension} (no projections, as in Mimi)")
        self.cfg = cfg
        dim, stride = cfg.seanet.dimension, cfg.resample_stride
        self.encoder = SeanetEncoder(cfg.seanet)
        self.encoder_transformer = Transformer(cfg.transformer, stride)
        # Learnt 25 -> 12.5 Hz conv; 'replicate' left padding as in moshi's ConvDownsample1d.
        self.downsample = CausalConv1d(dim, dim, 2 * stride, stride=stride, bias=False, replicate=True)
        self.quantizer = SplitResidualVQ(cfg)
        # Depthwise (groups = channels): moshi's default `upsample_channel_wise_bug=True`.
        self.upsample = CausalConvTranspose1d(dim, dim, 2 * stride, stride, bias=False, groups=dim)
        self.decoder_transformer = Transformer(cfg.transformer, stride)
        self.decoder = SeanetDecoder(cfg.seanet)

    @property
    def dtype(self) -> mx.Dtype:
        return self.downsample.weight.dtype

    def new_encoder_state(self, batch: int) -> MimiState:
        convs = [c.new_cache(batch, self.dtype) for c in self.encoder.convs() + [self.downsample]]
        return MimiState(batch, convs, self.encoder_transformer.new_cache(batch, self.dtype))

    def new_decoder_state(self, batch: int) -> MimiState:
        convs = [c.new_cache(batch, self.dtype) for c in [self.upsample] + self.decoder.convs()]
        return MimiState(batch, convs, self.decoder_transformer.new_cache(batch, self.dtype))

    # -- streaming

    def encode_step(self, pcm: mx.array, state: MimiState) -> mx.array:
        """pcm [B, n * 1920] -> codes [B, 8] (n = 1) or [B, 8, n]; advances `state`."""
        fs = self.cfg.frame_size
        if pcm.ndim != 2 or pcm.shape[1] == 0 or pcm.shape[1] % fs:
            raise ValueError(f"encode_step takes [B, n*{fs}] samples, got shape {pcm.shape}")
        x = pcm.astype(self.dtype)[:, :, None]
        *seanet, down = state.convs
        x = self.encoder(x, seanet)
        x = self.encoder_transformer(x, state.transformer)
        codes = self.quantizer.encode(self.downsample(x, down)).transpose(0, 2, 1)
        return codes[:, :, 0] if codes.shape[2] == 1 else codes

    def decode_step(self, codes: mx.array, state: MimiState) -> mx.array:
        """codes [B, 8] or [B, 8, n] -> pcm [B, n * 1920] float32; advances `state`."""
        if codes.ndim == 2:
            codes = codes[:, :, None]
        if codes.shape[1] != self.cfg.num_codebooks:
            raise ValueError(f"decode_step takes {self.cfg.num_codebooks} codebooks, got {codes.shape}")
        up, *seanet = state.convs
        x = self.quantizer.decode(codes.transpose(0, 2, 1)).astype(self.dtype)
        x = self.decoder_transformer(self.upsample(x, up), state.transformer)
        return self.decoder(x, seanet)[:, :, 0].astype(mx.float32)

    # -- whole clips

    # Whole clips go through in chunks of `chunk_frames`: attention then never spans more
    # than context + chunk steps (a 10 min clip in one piece would need a 15k x 15k mask),
    # and since a chunk is just a longer step, chunking changes nothing in the result.

    def encode(self, pcm: mx.array, chunk_frames: int = 125) -> mx.array:
        """pcm [B, T] -> codes [B, 8, ceil(T / 1920)]; the tail is zero-padded to a frame."""
        fs = self.cfg.frame_size
        pad = -pcm.shape[1] % fs
        if pad:
            pcm = mx.pad(pcm, [(0, 0), (0, pad)])
        state, chunk, out = self.new_encoder_state(pcm.shape[0]), chunk_frames * fs, []
        for start in range(0, pcm.shape[1], chunk):
            codes = self.encode_step(pcm[:, start:start + chunk], state)
            out.append(codes[:, :, None] if codes.ndim == 2 else codes)
            mx.eval(out[-1], *state.arrays())
        return mx.concatenate(out, axis=2)

    def decode(self, codes: mx.array, chunk_frames: int = 125) -> mx.array:
        """codes [B, 8, n] -> pcm [B, n * 1920]."""
        state, out = self.new_decoder_state(codes.shape[0]), []
        for start in range(0, codes.shape[2], chunk_frames):
            out.append(self.decode_step(codes[:, :, start:start + chunk_frames], state))
            mx.eval(out[-1], *state.arrays())
        return mx.concatenate(out, axis=1)
