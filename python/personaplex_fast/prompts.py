"""PersonaPlex's prompt phases, run before a conversation starts.

NVIDIA's PersonaPlex conditions the model with four phases, one 80 ms frame
each step, during which the model's own streams are forced (not sampled) and
the user's stream carries a constant 440 Hz tone ("sine frame"):

    1. voice prompt   model audio = the voice's Mimi codes,  text = PAD (3)
    2. spacer         model audio = a silent frame's codes,  text = PAD, 6 frames (0.5 s)
    3. text prompt    model audio = silence, text = the tokens of "<system> ... <system>"
    4. spacer         as 2

(see LMGen.step_system_prompts and its _step_* helpers in NVIDIA/personaplex).
Phase 1 is absent without a voice. PersonaPlex always has a text prompt (it
fails without one); here an empty one leaves phase 3 out, so the spacers meet.
A packaged voice (.pt) replaces phase 1 by the temporal transformer's input
embeddings recorded from the same phase, plus the token ring at its end.

Only the temporal transformer's state matters after the prompt, and every token
it reads during the prompt is known in advance, so `prefill` runs the prompt as
a few long chunks through the temporal transformer (no depformer, no sampling)
and then one ordinary step, instead of ~200 sequential steps; `Prefill` does the
same in slices of the caller's choosing (`serve` runs them between ticks).

Timing: PersonaPlex's LMGen spends its first call without running the model
(its step reads the ring one position behind ours); our step t corresponds to
its call t + 1, so the first prompt frame it is given is dropped there and here
alike, and its outputs come out one call later than ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .models.lm import LM, NOT_FORCED, UNGENERATED, LMState
from .sampling import SamplingConfig
from .tokenizer import TEXT_PAD, wrap_system  # noqa: F401  (wrap_system: re-exported)

SPACER_FRAMES = 6  # int(0.5 s * 12.5 Hz)
# Codes of the official Mimi for one frame of silence and one of the 440 Hz,
# 0.5-amplitude tone (constants of PersonaPlex's lm.py). A codec with another
# codebook size (tiny test checkpoints) gets its own codes by encoding the frames.
OFFICIAL_SILENCE_CODES = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
OFFICIAL_SINE_CODES = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
PREFILL_CHUNK = 64


def sine_frame(frame_size: int = 1920, sample_rate: int = 24000) -> np.ndarray:
    t = np.arange(frame_size) / sample_rate
    return (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


@dataclass(frozen=True)
class PromptFrame:
    text: int
    audio: tuple[int, ...] | None  # forced model codes; None: from a packaged voice


@dataclass(frozen=True)
class PackagedVoice:
    """A voice recorded as temporal input embeddings ([E, dim], positions 0..E-1)
    plus the token ring at the end of its voice phase: ring_tokens[j] holds the
    streams at position E + j (j = 0, 1), which carry its last voice frame."""

    embeddings: np.ndarray
    ring_tokens: np.ndarray  # [2, 1 + n_q]


def build_frames(voice_codes: np.ndarray | None, n_voice_frames: int, text_tokens: list[int],
                 silence: tuple[int, ...]) -> list[PromptFrame]:
    """The forced frames of the four phases, in PersonaPlex's call order."""
    frames = []
    if voice_codes is not None:
        frames += [PromptFrame(TEXT_PAD, tuple(int(c) for c in row)) for row in voice_codes]
    else:
        frames += [PromptFrame(TEXT_PAD, None)] * n_voice_frames
    frames += [PromptFrame(TEXT_PAD, silence)] * SPACER_FRAMES
    frames += [PromptFrame(int(t), silence) for t in text_tokens]
    frames += [PromptFrame(TEXT_PAD, silence)] * SPACER_FRAMES
    return frames


def input_tokens(lm: LM, frames: list[PromptFrame], sine: tuple[int, ...], position: int,
                 voice: PackagedVoice | None = None) -> np.ndarray:
    """The [1 + n_q] tokens the temporal transformer reads at `position` of the prompt.

    Step t forces frame t + 1 (PersonaPlex's frame 0 is never read), each stream
    at its delay, and streams still within their delay read the initial token.
    """
    cfg = lm.cfg
    out = np.empty(1 + cfg.n_q, dtype=np.int64)
    initial = [cfg.text_initial_token] + [cfg.audio_initial_token] * cfg.n_q
    for c, delay in enumerate(cfg.delays):
        if position <= delay:
            out[c] = initial[c]
        elif c == 0:
            out[c] = frames[position].text
        elif c <= cfg.dep_q:
            frame = frames[position - delay]
            if frame.audio is None:  # inside a packaged voice: its recorded ring
                out[c] = voice.ring_tokens[position - len(voice.embeddings)][c]
            else:
                out[c] = frame.audio[c - 1]
        else:
            out[c] = sine[c - 1 - cfg.dep_q]
    return out


class Prefill:
    """A batch-of-one LM state going through the prompt frames, a slice at a time.

    Equivalent to stepping the LM once per frame with the frames forced (tested),
    but the first len(frames) - 1 steps run as chunks of the temporal transformer,
    and the last as one ordinary step. `advance(n)` runs up to n more frames (the
    last step counts as one), so a server can interleave a prompt with its ticks;
    the state (and its KV cache) is only allocated by the first advance.
    """

    def __init__(self, lm: LM, frames: list[PromptFrame], sine: tuple[int, ...], seed: int = 0,
                 voice: PackagedVoice | None = None, sampling: SamplingConfig = SamplingConfig()):
        if len(frames) < 2:
            raise ValueError("a prompt needs at least two frames")
        if frames[-1].audio is None:  # a packaged voice shorter than the prompt cannot end it
            raise ValueError("the prompt's last frame must carry audio codes")
        self.lm, self.frames, self.sine, self.seed, self.voice, self.sampling = (
            lm, frames, sine, seed, voice, sampling)
        self.voice_frames = 0 if voice is None else len(voice.embeddings)
        self.position = 0  # prompt frames fed so far
        self.state: LMState | None = None
        self.done = False

    @property
    def frames_left(self) -> int:
        return len(self.frames) - self.position

    def advance(self, max_frames: int = PREFILL_CHUNK) -> bool:
        """Run up to max_frames (>= 1) more prompt frames; True once the state is ready."""
        lm, P, E = self.lm, len(self.frames), self.voice_frames
        if self.state is None:
            self.state = lm.new_state(1, seed=self.seed)
        start = self.position
        if start < E:  # a packaged voice: its recorded embeddings
            end = min(start + max_frames, E)
            x = mx.array(self.voice.embeddings[start:end]).astype(lm.dtype)[None]
        elif start < P - 1:
            end = min(start + max_frames, P - 1)
            tokens = np.stack([input_tokens(lm, self.frames, self.sine, p, self.voice) for p in range(start, end)])
            x = lm.embed_frame_sequence(mx.array(tokens.astype(np.int32)))
        else:
            self._last_step()
            self.position, self.done = P, True
            return True
        _run_chunk(lm, self.state, x)
        self.position = end
        return False

    def _last_step(self) -> None:
        # The token rings as the last forced step leaves them: the input of position
        # P - 1, and the delayed streams of the last frame forced at position P.
        lm, cfg, state, P = self.lm, self.lm.cfg, self.state, len(self.frames)
        ring = state.tokens.shape[-1]
        tokens = np.full((1, cfg.n_q + 1, ring), UNGENERATED, dtype=np.int32)
        tokens[0, :, (P - 1) % ring] = input_tokens(lm, self.frames, self.sine, P - 1, self.voice)
        forced = np.full((1, cfg.dep_q + 1, ring), NOT_FORCED, dtype=np.int32)
        last = self.frames[P - 1].audio
        for c in range(1, cfg.dep_q + 1):
            if cfg.delays[c] > 0:
                forced[0, c, (P - 1 + cfg.delays[c]) % ring] = last[c - 1]
        state.tokens, state.forced = mx.array(tokens), mx.array(forced)
        # The last prompt step runs in full: it also generates the first conversation frame.
        lm.step(state, mx.array([self.sine], dtype=mx.int32), self.sampling)
        mx.eval(state.offsets, state.tokens, state.forced, state.key, *state.kv.arrays())


def prefill(lm: LM, frames: list[PromptFrame], sine: tuple[int, ...], seed: int = 0,
            voice: PackagedVoice | None = None,
            sampling: SamplingConfig = SamplingConfig()) -> LMState:
    """A batch-of-one LM state that has gone through the prompt frames (see Prefill)."""
    run = Prefill(lm, frames, sine, seed, voice, sampling)
    while not run.advance(PREFILL_CHUNK):
        pass
    return run.state


def _run_chunk(lm: LM, state: LMState, x: mx.array) -> None:
    lm.temporal_sequence(x, state)
    state.offsets = state.offsets + x.shape[1]
    mx.eval(state.offsets, *state.kv.arrays())
