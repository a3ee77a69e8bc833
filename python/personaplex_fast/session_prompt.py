"""Turn a voice and a text prompt into a prompted LM state for one session."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .errors import UserError
from .models.lm import LMState
from .models.mimi import Mimi
from .prompts import (OFFICIAL_SILENCE_CODES, OFFICIAL_SINE_CODES, PackagedVoice, build_frames,
                      prefill, sine_frame, wrap_system)
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


def prompt_state(lm, mimi: Mimi, voice: Voice | None, text_tokens: list[int], seed: int = 0,
                 sampling: SamplingConfig = SamplingConfig()) -> LMState | None:
    """The prompted batch-of-one LM state, or None when there is nothing to prompt."""
    if voice is None and not text_tokens:
        return None
    silence, sine = special_codes(mimi)
    packaged = voice if isinstance(voice, PackagedVoice) else None
    if isinstance(voice, AudioVoice):
        codes = encode_frames(mimi, voice.pcm)
        frames = build_frames(codes, len(codes), text_tokens, silence)
    else:
        n_voice = 0 if packaged is None else len(packaged.embeddings) + 1
        if packaged is not None and packaged.embeddings.shape[1] != lm.cfg.dim:
            raise UserError(f"voice embeddings have width {packaged.embeddings.shape[1]}, "
                            f"the model needs {lm.cfg.dim}: the voice belongs to another model")
        frames = build_frames(None, n_voice, text_tokens, silence)
    return prefill(lm, frames, sine, seed=seed, voice=packaged, sampling=sampling)


def text_prompt_tokens(tokenizer, text: str | None) -> list[int]:
    if not text:
        return []
    if tokenizer is None:
        raise UserError("this model has no text tokenizer (tokenizer_spm_32k_3.model): "
                        "a text prompt cannot be used")
    return list(tokenizer.encode(wrap_system(text)))
