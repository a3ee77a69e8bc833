"""The duplex engine: one 80 ms tick for a batch of conversation sessions.

A tick takes one 1920-sample frame of user audio per session and returns one
frame of model audio and one text token per session:

    user pcm --Mimi encode--> user codes --LM step--> text + model codes --Mimi decode--> pcm

The batch has a fixed number of slots. Sessions join into a free slot (which is
reset) and leave between ticks; the other sessions' state is untouched. Free
slots are fed silence and their outputs dropped, so the batch shape never
changes and nothing is recompiled.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import ops, tick
from .models.cache import KV_BITS
from .models.lm import LM, UNGENERATED, LMState
from .models.mimi import Mimi, MimiState
from .sampling import SamplingConfig


@dataclass
class TickOutput:
    pcm: np.ndarray  # [B, 1920] float32 model audio (silence while warming up)
    text: np.ndarray  # [B] int text token, UNGENERATED (-2) while warming up


class SessionsFull(RuntimeError):
    pass


class Engine:
    """program: run each tick as one tick program (tick/) — the default where the
    fused kernels run and the models fit it — or op by op (False; the only way in
    "reference" and "check" modes, where every primitive is compared or replaced).
    kv_bits 8: the temporal transformer's KV cache in 8 bits (models/cache.py), on
    either path; None: in the LM's dtype."""

    def __init__(self, lm: LM, mimi: Mimi, slots: int = 1,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0, program: bool | None = None,
                 kv_bits: int | None = None):
        if lm.cfg.card != mimi.cfg.quantizer.bins:
            raise ValueError(f"LM audio card {lm.cfg.card} != Mimi codebook size {mimi.cfg.quantizer.bins}")
        if kv_bits not in (None, *KV_BITS):
            raise ValueError(f"kv_bits must be one of {KV_BITS} or None, got {kv_bits}")
        self.lm, self.mimi, self.sampling = lm, mimi, sampling
        self.kv_bits = kv_bits
        self.slots = slots
        self.frame_size = mimi.cfg.frame_size
        self.active = [False] * slots
        self.seed = seed
        self._joins = 0
        self.program: tick.TickRunner | None = None
        # A primitive whose self-test failed here runs its reference (ops.fallbacks); the
        # program would run its kernel regardless, so the engine goes op by op then, and
        # where the program itself (or, with kv_bits 8, its 8-bit attention) failed.
        if program is not False and ops.program_applies(kv_bits):
            gpu = mx.default_device().type == mx.gpu
            why = tick.supported(lm, mimi, gpu)
            if why is None:
                self.program = tick.TickRunner(lm, mimi, slots, sampling, gpu, kv_bits=kv_bits)
            elif program:
                raise tick.Unsupported(why)
        if self.program is not None:
            # Per slot: the reset bits for the next tick, and the session's seed.
            self._control = np.zeros((slots, tick.CONTROL_COLS), np.int32)
            self._control[:, 0] = tick.RESET_ALL
        else:
            self.lm_state: LMState = lm.new_state(slots, seed=seed, kv_bits=kv_bits)
            self.encoder: MimiState = mimi.new_encoder_state(slots)
            self.decoder: MimiState = mimi.new_decoder_state(slots)

    # -- sessions

    def join(self, prompt: LMState | None = None, seed: int | None = None) -> int:
        """Take a free slot, fresh or continuing from a prompted batch-of-one LM state
        (prompts.prefill): the slot's KV rows, positions and token rings are copied in.
        seed: the session's sampling seed (tick programs; default: from the engine's
        seed and the number of joins so far)."""
        for slot, used in enumerate(self.active):
            if not used:
                self.reset(slot, seed)
                if prompt is not None:
                    self._load_row(slot, prompt)
                self.active[slot] = True
                self._joins += 1
                return slot
        raise SessionsFull(f"all {self.slots} session slots are in use")

    def _load_row(self, slot: int, src: LMState) -> None:
        if self.program is not None:
            self.program.load_lm_row(slot, src)
            self._control[slot, 0] &= ~tick.RESET_LM
            return
        dst = self.lm_state
        dst.kv.load(slot, *src.kv.rows(0, self.kv_bits))
        dst.offsets[slot] = src.offsets[0]
        dst.tokens[slot] = src.tokens[0]
        dst.forced[slot] = src.forced[0]
        mx.eval(dst.offsets, dst.tokens, dst.forced, *dst.kv.arrays())

    def leave(self, slot: int) -> None:
        self.active[slot] = False

    def reset(self, slot: int, seed: int | None = None) -> None:
        if self.program is not None:
            self._control[slot, 0] = tick.RESET_ALL
            self._control[slot, 1] = (self.seed * 1_000_003 + self._joins if seed is None else seed) & 0x7FFFFFFF
            return
        self.lm_state.reset([slot])
        self.encoder.reset(slot)
        self.decoder.reset(slot)

    def seek(self, frame: int) -> None:
        """Put every session at `frame` of its conversation (benchmarks: each step then
        attends over a full window)."""
        if self.program is not None:
            self.program.set_offsets(np.full(self.slots, frame, np.int32))
        else:
            self.lm_state.offsets = mx.full((self.slots,), frame, dtype=mx.int32)

    # -- one frame

    def tick(self, pcm: np.ndarray) -> TickOutput:
        """pcm [slots, 1920] float32 (rows of free slots are ignored)."""
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.shape != (self.slots, self.frame_size):
            raise ValueError(f"tick takes [{self.slots}, {self.frame_size}] samples, got {pcm.shape}")
        if self.program is not None:
            audio, tokens = self.program(mx.array(pcm), mx.array(self._control))
            mx.eval(audio, tokens)
            self._control[:, 0] = 0
            return TickOutput(np.array(audio), np.array(tokens)[:, 0])
        user = self.mimi.encode_step(mx.array(pcm), self.encoder)
        out = self.lm.step(self.lm_state, user[:, : self.lm.cfg.user_q], self.sampling)
        # Warm-up frames have no model codes yet: decode code 0 and mute the result,
        # which keeps the decoder's streaming state advancing in lockstep.
        codes = mx.where(out.valid[:, None], out.audio, 0)
        audio = self.mimi.decode_step(codes, self.decoder)
        audio = mx.where(out.valid[:, None], audio, 0.0)
        mx.eval(audio, out.text, *self.state_arrays())
        return TickOutput(np.array(audio), np.array(out.text))

    def state_arrays(self) -> list[mx.array]:
        s = self.lm_state
        return [s.offsets, s.tokens, s.forced, s.key, *s.kv.arrays(), *self.encoder.arrays(), *self.decoder.arrays()]


def is_text(token: int) -> bool:
    return token != UNGENERATED
