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

import types

import mlx.core as mx
import mlx.nn as nn

from .. import ops
from ..config import MimiConfig
from .mimi_layers import (CausalConv1d, CausalConvTranspose1d, MimiTransformer, SeanetDecoder,
                          SeanetEncoder)


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
        self.transformer = transformer  # MimiTransformerCache

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
        self.encoder_transformer = MimiTransformer(cfg.transformer, stride)
        # Learnt 25 -> 12.5 Hz conv; 'replicate' left padding as in moshi's ConvDownsample1d.
        self.downsample = CausalConv1d(dim, dim, 2 * stride, stride=stride, bias=False, replicate=True)
        self.quantizer = SplitResidualVQ(cfg)
        # Depthwise (groups = channels): moshi's default `upsample_channel_wise_bug=True`.
        self.upsample = CausalConvTranspose1d(dim, dim, 2 * stride, stride, bias=False, groups=dim)
        self.decoder_transformer = MimiTransformer(cfg.transformer, stride)
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
