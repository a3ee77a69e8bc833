"""Turn a voice and a text prompt into a prompted LM state for one session."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import UserError
from .models.lm import LMState
from .models.mimi import Mimi
from .prompts import (OFFICIAL_SILENCE_CODES, OFFICIAL_SINE_CODES, PREFILL_CHUNK, PackagedVoice, Prefill,
                      build_frames, sine_frame, wrap_system)
from .sampling import SamplingConfig
from .voices import AudioVoice, Voice


def encode_frames(mimi: Mimi, pcm: np.ndarray) -> np.ndarray:
    """Mimi codes [frames, 8] of a clip streamed from a fresh state (zero-padded tail)."""
    fs = mimi.cfg.frame_size
    n = -(-len(pcm) // fs)
    padded = np.zeros(n * fs, dtype=np.float32)
    padded[: len(pcm)] = pcm
    state = mimi.new_encoder_state(1)
    codes = []
    for i in range(n):
        c = mimi.encode_step(mx.array(padded[None, i * fs:(i + 1) * fs]), state)
        mx.eval(c, *state.arrays())
        codes.append(np.array(c[0]))
    return np.stack(codes)


def special_codes(mimi: Mimi) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(silence, sine) frame codes: PersonaPlex's constants for the official codec,
    otherwise the codec's own encoding of those frames."""
    if mimi.cfg.quantizer.bins == 2048 and mimi.cfg.num_codebooks == len(OFFICIAL_SINE_CODES):
        return OFFICIAL_SILENCE_CODES, OFFICIAL_SINE_CODES
    fs = mimi.cfg.frame_size
    silence = encode_frames(mimi, np.zeros(fs, dtype=np.float32))[0]
    sine = encode_frames(mimi, sine_frame(fs))[0]
    return tuple(int(c) for c in silence), tuple(int(c) for c in sine)


@dataclass(frozen=True)
class EncodedVoice:
    """An audio voice already through Mimi: its codes [frames, num_codebooks]."""

    codes: np.ndarray


def prepare_voice(mimi: Mimi, voice: Voice) -> PackagedVoice | EncodedVoice:
    """A voice as the prompt needs it: an audio voice is encoded once (a server keeps
    the result; every session choosing it then skips the codec)."""
    return EncodedVoice(encode_frames(mimi, voice.pcm)) if isinstance(voice, AudioVoice) else voice


def prompt_prefill(lm, mimi: Mimi, voice: Voice | EncodedVoice | None, text_tokens: list[int],
                   seed: int = 0, sampling: SamplingConfig = SamplingConfig(),
                   special: tuple | None = None) -> Prefill | None:
    """The prompt of one session, ready to run (None when there is nothing to prompt).
    Refused here, before any work: text ids outside the text table, and a prompt
    longer than the model's context (its start would be overwritten before the
    conversation begins). `special`: special_codes(mimi), when the caller keeps them."""
    if voice is None and not text_tokens:
        return None
    cfg = lm.cfg
    if any(not 0 <= t < cfg.text_card for t in text_tokens):
        raise UserError(f"the text tokenizer gives ids outside the model's {cfg.text_card}-entry text "
                        "table: it belongs to another model")
    silence, sine = special or special_codes(mimi)
    if isinstance(voice, AudioVoice):
        voice = prepare_voice(mimi, voice)
    packaged = voice if isinstance(voice, PackagedVoice) else None
    if isinstance(voice, EncodedVoice):
        frames = build_frames(voice.codes, len(voice.codes), text_tokens, silence)
    else:
        n_voice = 0 if packaged is None else len(packaged.embeddings) + 1
        if packaged is not None and packaged.embeddings.shape[1] != cfg.dim:
            raise UserError(f"voice embeddings have width {packaged.embeddings.shape[1]}, "
                            f"the model needs {cfg.dim}: the voice belongs to another model")
        frames = build_frames(None, n_voice, text_tokens, silence)
    if len(frames) > cfg.context:
        raise UserError(f"the prompt is {len(frames)} frames long ({len(frames) - len(text_tokens)} of voice "
                        f"and spacers, {len(text_tokens)} text tokens); the model's context holds {cfg.context}")
    return Prefill(lm, frames, sine, seed=seed, voice=packaged, sampling=sampling)


def prompt_state(lm, mimi: Mimi, voice: Voice | None, text_tokens: list[int], seed: int = 0,
                 sampling: SamplingConfig = SamplingConfig()) -> LMState | None:
    """The prompted batch-of-one LM state, or None when there is nothing to prompt."""
    from tqdm import tqdm

    run = prompt_prefill(lm, mimi, voice, text_tokens, seed, sampling)
    if run is None:
        return None
    # disable=None: a bar on a terminal, nothing in a log or a pipe.
    with tqdm(total=len(run.frames), desc="prompt", unit="frame", disable=None, leave=False) as bar:
        while not run.advance(PREFILL_CHUNK):
            bar.update(len(run.frames) - run.frames_left - bar.n)
    return run.state


def text_prompt_tokens(tokenizer, text: str | None) -> list[int]:
    if not text:
        return []
    if tokenizer is None:
        raise UserError("this model has no text tokenizer (tokenizer_spm_32k_3.model): "
                        "a text prompt cannot be used")
    return list(tokenizer.encode(wrap_system(text)))
