"""The PersonaPlex / Moshi language model: temporal transformer + depformer.

One step consumes one 80 ms frame per session: the user's audio codes come in,
one text token and the model's `dep_q` audio codes come out. The streams are
offset in time by the acoustic delays (`config.delays`); the step keeps a small
ring of delayed tokens per session, so the caller feeds and receives aligned
frames and never sees the delays, exactly like the official `LMGen.step`:

    inputs at frame t   text(t-1 generated), model audio, user audio, each read
                        from the delayed token ring at t
    outputs at frame t  the frame whose last delayed stream just completed
                        (max_delay frames late; earlier outputs are invalid)

A batch holds B independent sessions with their own positions; `LMState` is the
whole per-session state and can be reset per session.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..config import LMConfig
from .. import ops
from ..reference import DepformerWeights, LayerStack
from ..sampling import SamplingConfig, gumbel_noise, sample
from .cache import RingKVCache
from .transformer import RMSNorm, Transformer, linear

ZERO_TOKEN = -1  # "no input": its embedding is exactly zero
UNGENERATED = -2  # output slot not produced yet (warm-up frames)
NOT_FORCED = -1  # in force_text / force_audio: sample this token


def embed(table: nn.Embedding, ids: mx.array) -> mx.array:
    # MLX's take does no bounds check: an id past the table reads other memory, so ids
    # are clamped to the table here as in reference.embed_rows (they are validated
    # where they come from; this is the lookup that cannot be fooled).
    out = table(mx.clip(ids, 0, table.weight.shape[0] - 1))
    return mx.where((ids == ZERO_TOKEN)[..., None], mx.zeros((), out.dtype), out)


@dataclass
class LMState:
    """Per-session streaming state for a batch of sessions."""

    kv: RingKVCache
    offsets: mx.array  # [B] frames stepped so far, per session
    tokens: mx.array  # [B, 1 + n_q, max_delay + 2] delayed token ring
    forced: mx.array  # [B, 1 + dep_q, max_delay + 2] tokens to emit instead of sampling, -1: none
    key: mx.array  # sampling PRNG key

    def reset(self, sessions: list[int] | None = None) -> None:
        """Restart the given sessions (all if None) from frame 0.

        Their KV slots need no clearing: attention only reads positions at or
        after the session's restart, which are rewritten before being read.
        """
        B = self.offsets.shape[0]
        mask = mx.ones((B,), dtype=mx.bool_)
        if sessions is not None:
            mask = mx.zeros((B,), dtype=mx.bool_)
            mask[mx.array(sessions, dtype=mx.int32)] = True
        self.offsets = mx.where(mask, 0, self.offsets)
        self.tokens = mx.where(mask[:, None, None], UNGENERATED, self.tokens)
        self.forced = mx.where(mask[:, None, None], NOT_FORCED, self.forced)


@dataclass
class StepOutput:
    text: mx.array  # [B] int32, UNGENERATED where not valid yet
    audio: mx.array  # [B, dep_q] int32, UNGENERATED where not valid yet
    valid: mx.array  # [B] bool
    text_logits: mx.array  # [B, text_card] logits of the token sampled this step


class _Memo:
    """What the forward pass derives from the weights' layout (the named weights of the
    fused stacks), kept between steps: gathering them walks every layer in Python
    (~3.6 ms a step for the 7B on the 2-core CI machine). A plain object, so nn.Module keeps it out of the
    parameters; LM.update / update_modules (load_weights, set_dtype, nn.quantize)
    clear it."""

    def __init__(self):
        self.values: dict = {}

    def get(self, key, make):
        if key not in self.values:
            self.values[key] = make()
        return self.values[key]


class LM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self._memo = _Memo()
        d = cfg.depformer
        f32 = cfg.norm == "rms_norm_f32"
        self.text_emb = nn.Embedding(cfg.text_card + 1, cfg.dim)
        self.emb = [nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q)]
        self.transformer = Transformer(
            cfg.num_layers, dim=cfg.dim, num_heads=cfg.num_heads, ffn_hidden=cfg.ffn_hidden,
            norm_eps=cfg.norm_eps, norm_f32=f32)
        self.out_norm = RMSNorm(cfg.dim, cfg.norm_eps, f32)
        self.text_linear = nn.Linear(cfg.dim, cfg.text_card, bias=False)
        n_in = cfg.dep_q if d.multi_linear else 1
        self.depformer_in = [nn.Linear(cfg.dim, d.dim, bias=False) for _ in range(n_in)]
        self.depformer_text_emb = nn.Embedding(cfg.text_card + 1, d.dim)
        self.depformer_emb = [nn.Embedding(cfg.card + 1, d.dim) for _ in range(cfg.dep_q - 1)]
        steps = cfg.dep_q if d.weights_per_step else 1
        self.depformer = Transformer(
            d.num_layers, dim=d.dim, num_heads=d.num_heads, ffn_hidden=d.ffn_hidden,
            norm_eps=cfg.norm_eps, norm_f32=f32, steps=steps)
        self.linears = [nn.Linear(d.dim, cfg.card, bias=False) for _ in range(cfg.dep_q)]

    def update(self, parameters: dict, strict: bool = True) -> "LM":
        self._memo.values.clear()
        return super().update(parameters, strict)

    def update_modules(self, modules: dict, strict: bool = True) -> "LM":
        self._memo.values.clear()
        return super().update_modules(modules, strict)

    @property
    def dtype(self) -> mx.Dtype:
        return self.text_emb.weight.dtype

    def new_state(self, batch: int, seed: int = 0, kv_bits: int | None = None) -> LMState:
        """kv_bits 8: the temporal transformer's KV cache in 8 bits (models/cache.py)."""
        cfg = self.cfg
        kv = RingKVCache(cfg.num_layers, batch, cfg.num_heads, cfg.context, cfg.head_dim, self.dtype, kv_bits)
        ring = cfg.max_delay + 2
        tokens = mx.full((batch, cfg.n_q + 1, ring), UNGENERATED, dtype=mx.int32)
        forced = mx.full((batch, cfg.dep_q + 1, ring), NOT_FORCED, dtype=mx.int32)
        return LMState(kv, mx.zeros((batch,), dtype=mx.int32), tokens, forced, mx.random.key(seed))

    def embed_frame(self, tokens: mx.array) -> mx.array:
        """tokens [B, 1 + n_q] (text, model audio, user audio) -> [B, 1, dim]."""
        return self.embed_frame_sequence(tokens[:, None])

    def embed_frame_sequence(self, tokens: mx.array) -> mx.array:
        """tokens [B, T, 1 + n_q] (or [T, 1 + n_q] for one session) -> [B, T, dim]."""
        if tokens.ndim == 2:
            tokens = tokens[None]
        x = embed(self.text_emb, tokens[..., 0])
        for c in range(self.cfg.n_q):
            x = x + embed(self.emb[c], tokens[..., 1 + c])
        return x

    def temporal_sequence(self, x: mx.array, state: LMState) -> mx.array:
        """Feed [B, T, dim] inputs through the temporal transformer at the sessions'
        positions (T > 1: a prompt chunk); the caller advances state.offsets."""
        return self.transformer(x, state.kv, state.offsets, 0, self.cfg.max_period,
                                stack=self.temporal_stack())

    def temporal_stack(self) -> LayerStack | None:
        """The temporal transformer's stack_weights, kept between steps (see _Memo)."""
        return self._memo.get("temporal", lambda: self.transformer.stack_weights(0))

    def depformer_stack(self, step: int) -> LayerStack | None:
        """The depformer's stack_weights for codebook step `step` (0 when the steps
        share their weights), kept between steps (see _Memo)."""
        return self._memo.get(("depformer", step), lambda: self.depformer.stack_weights(step))

    def temporal(self, x: mx.array, state: LMState) -> tuple[mx.array, mx.array]:
        """[B, 1, dim] embeddings -> (normed hidden [B, 1, dim], text logits [B, text_card])."""
        h = self.transformer(x, state.kv, state.offsets, 0, self.cfg.max_period, stack=self.temporal_stack())
        h = self.out_norm(h)
        return h, linear(self.text_linear, h)[:, 0]

    def depformer_weights(self) -> DepformerWeights | None:
        """The depformer's weights for ops.depformer_frame, or None where a part has no
        such form (see Transformer.stack_weights, ops.projection; an embedding that is
        not a plain table); kept between steps (see _Memo)."""
        return self._memo.get("depformer", self._depformer_weights)

    def _depformer_weights(self) -> DepformerWeights | None:
        steps = self.cfg.dep_q if self.cfg.depformer.weights_per_step else 1
        stacks = tuple(self.depformer_stack(s) for s in range(steps))
        in_projs = tuple(ops.projection(m) for m in self.depformer_in)
        heads = tuple(ops.projection(m) for m in self.linears)
        tables = [self.depformer_text_emb, *self.depformer_emb]
        if any(part is None for part in stacks + in_projs + heads):
            return None
        if any(type(t) is not nn.Embedding for t in tables):
            return None
        return DepformerWeights(in_projs=in_projs, tables=tuple(t.weight for t in tables), stacks=stacks,
                                heads=heads)

    def depformer_frame(self, h: mx.array, text: mx.array, sampling: SamplingConfig,
                        key: mx.array, forced: mx.array | None = None) -> mx.array:
        """Sample the dep_q model codebooks of one frame, in order. h: [B, 1, dim].

        forced [B, dep_q]: a token >= 0 replaces the sampled one, also as the next
        codebook's input (teacher forcing, as PersonaPlex's voice prompt does).
        One primitive (ops.depformer_frame) runs the whole frame where the weights
        fit it; the per-op loop below is the same computation for those that don't.
        """
        cfg, d = self.cfg, self.cfg.depformer
        B = h.shape[0]
        rope = d.max_period if d.pos_emb == "rope" else None
        noise = gumbel_noise((cfg.dep_q, B, cfg.card), sampling.greedy, sampling.temp_audio, key)
        forced = mx.full((B, cfg.dep_q), NOT_FORCED, mx.int32) if forced is None else forced
        pick = dict(temp=sampling.temp_audio, top_k=sampling.topk_audio, greedy=sampling.greedy)
        weights = self.depformer_weights()
        if ops.depformer_fusable(h, weights, d.num_heads):
            codes, _ = ops.depformer_frame(h[:, 0], text, forced.T, noise, weights, heads=d.num_heads,
                                           rope_max_period=rope, **pick)
            return codes.T
        # A fresh cache per frame: the depformer's context is the frame's own steps.
        cache = RingKVCache(d.num_layers, B, d.num_heads, cfg.dep_q, d.head_dim, h.dtype)
        prev, codes = text, []
        for k in range(cfg.dep_q):
            x = linear(self.depformer_in[k if d.multi_linear else 0], h)
            table = self.depformer_text_emb if k == 0 else self.depformer_emb[k - 1]
            x = x + embed(table, prev[:, None])
            pos = mx.full((B,), k, dtype=mx.int32)
            step = k if d.weights_per_step else 0
            x = self.depformer(x, cache, pos, step, rope, stack=self.depformer_stack(step))
            logits = linear(self.linears[k], x)[:, 0]
            prev = ops.sample_topk(logits, None if noise is None else noise[k], forced[:, k], **pick)
            codes.append(prev)
        return mx.stack(codes, axis=1)

    def step(self, state: LMState, user_codes: mx.array,
             sampling: SamplingConfig = SamplingConfig(), force_text: mx.array | None = None,
             force_audio: mx.array | None = None, embeddings: mx.array | None = None,
             use_embeddings: mx.array | None = None) -> StepOutput:
        """One frame for every session.

        user_codes [B, n_q - dep_q]: the user's audio codes of this frame (aligned).
        force_text [B], force_audio [B, dep_q]: tokens the model must emit for the
            frame this step generates instead of sampling them (NOT_FORCED = sample);
            each stream is forced at its own delay, like the user's streams.
        embeddings [B, 1, dim] with use_embeddings [B] bool: feed these as the
            temporal input instead of the embedded tokens (precomputed voice prompts).
        """
        cfg = self.cfg
        B = state.offsets.shape[0]
        ring = state.tokens.shape[-1]
        delays = mx.array(cfg.delays, dtype=mx.int32)
        gen_delays = delays[:1 + cfg.dep_q]
        o = state.offsets
        user = mx.array(user_codes).astype(mx.int32).reshape(B, cfg.user_q)

        # The user's streams enter the ring at their own delay.
        user_delays = delays[1 + cfg.dep_q:]
        tokens = _ring_write(state.tokens, 1 + cfg.dep_q, user, (o[:, None] + user_delays) % ring)
        # So do forced tokens, for the frame generated now (position o + 1).
        force = mx.full((B, 1 + cfg.dep_q), NOT_FORCED, dtype=mx.int32)
        if force_text is not None:
            force = mx.concatenate([mx.array(force_text).astype(mx.int32).reshape(B, 1), force[:, 1:]], 1)
        if force_audio is not None:
            audio_force = mx.array(force_audio).astype(mx.int32).reshape(B, cfg.dep_q)
            force = mx.concatenate([force[:, :1], audio_force], 1)
        forced = _ring_write(state.forced, 0, force, (o[:, None] + 1 + gen_delays[None, :]) % ring)

        # This frame's input: the ring at o, or the initial token while a stream's
        # delay has not elapsed yet.
        cur = _ring_read(tokens, (o % ring)[:, None] + mx.zeros((1, cfg.n_q + 1), mx.int32))
        initial = mx.array([cfg.text_initial_token] + [cfg.audio_initial_token] * cfg.n_q, mx.int32)
        cur = mx.where(o[:, None] <= delays[None, :], initial[None, :], cur)

        x = self.embed_frame(cur)
        if embeddings is not None:
            x = mx.where(use_embeddings[:, None, None], embeddings.astype(x.dtype), x)
        h, text_logits = self.temporal(x, state)
        key, k_text, k_audio = mx.random.split(state.key, 3)
        now = _ring_read(forced, ((o + 1) % ring)[:, None] + mx.zeros((1, 1 + cfg.dep_q), mx.int32))
        text = sample(text_logits, sampling.temp_text, sampling.topk_text, sampling.greedy, k_text, now[:, 0])
        audio = self.depformer_frame(h, text, sampling, k_audio, now[:, 1:])

        o = o + 1
        generated = mx.concatenate([text[:, None], audio], axis=1)
        tokens = _ring_write(tokens, 0, generated, (o % ring)[:, None] + mx.zeros((1, 1 + cfg.dep_q), mx.int32))
        out = _ring_read(tokens, (o[:, None] - cfg.max_delay + gen_delays[None, :]) % ring)
        valid = o > cfg.max_delay
        out = mx.where(valid[:, None], out, UNGENERATED)

        state.offsets, state.tokens, state.forced, state.key = o, tokens, forced, key
        return StepOutput(out[:, 0], out[:, 1:], valid, text_logits)


def _ring_write(tokens: mx.array, first: int, values: mx.array, slots: mx.array) -> mx.array:
    """tokens[b, first + c, slots[b, c]] = values[b, c], for per-session slots."""
    n = values.shape[1]
    ring = tokens.shape[-1]
    hit = mx.arange(ring)[None, None, :] == slots[:, :, None]
    block = mx.where(hit, values[:, :, None], tokens[:, first:first + n])
    return mx.concatenate([tokens[:, :first], block, tokens[:, first + n:]], axis=1)


def _ring_read(tokens: mx.array, slots: mx.array) -> mx.array:
    """tokens[b, c, slots[b, c]] for the first slots.shape[1] streams."""
    n = slots.shape[1]
    return mx.take_along_axis(tokens[:, :n], slots[:, :, None], axis=2)[:, :, 0]
