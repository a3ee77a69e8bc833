"""`offline`: a whole conversation from a wav file, frame by frame, as if live.

The input is streamed through the same engine tick as a live session (after the
prompt phases), so the output wav has exactly the input's duration at 24 kHz and
the transcript's frame times are those a live listener would have seen.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .audio import SAMPLE_RATE, write_wav
from .engine import Engine, is_text
from .errors import UserError
from .sampling import SamplingConfig


def run_offline(engine: Engine, pcm: np.ndarray, progress: bool = True,
                prompt=None) -> tuple[np.ndarray, list[dict]]:
    """pcm [T] float32 at 24 kHz -> (model pcm [T], text tokens with frame times).

    `prompt`: a prompted LM state (prompts.prefill) the session starts from.
    """
    fs = engine.frame_size
    frames = -(-len(pcm) // fs)
    padded = np.zeros(frames * fs, dtype=np.float32)
    padded[: len(pcm)] = pcm
    slot = engine.join(prompt)
    out = np.zeros_like(padded)
    tokens = []
    batch = np.zeros((engine.slots, fs), dtype=np.float32)
    for i in tqdm(range(frames), desc="frames", unit="frame", disable=not progress):
        batch[slot] = padded[i * fs:(i + 1) * fs]
        tick = engine.tick(batch)
        out[i * fs:(i + 1) * fs] = tick.pcm[slot]
        token = int(tick.text[slot])
        if is_text(token):
            tokens.append({"frame": i, "time_s": round(i * fs / SAMPLE_RATE, 3), "token": token})
    engine.leave(slot)
    return out[: len(pcm)], tokens


# The default cap on the input's length: an hour of conversation is ~350 MB of samples
# in and as much out; a longer file is refused before it is decoded.
MAX_INPUT_SECONDS = 3600.0


def offline(engine: Engine, pcm: np.ndarray, output_wav: str | Path, output_text: str | Path,
            decode=None, prompt=None) -> float:
    """The conversation of `pcm` (24 kHz) written out; -> the seconds it took."""
    start = time.perf_counter()
    out, tokens = run_offline(engine, pcm, prompt=prompt)
    took = time.perf_counter() - start
    if decode is not None:
        for t in tokens:
            t["text"] = decode(t["token"])
    write_wav(output_wav, out, SAMPLE_RATE)
    try:
        Path(output_text).write_text(json.dumps(
            {"sample_rate": SAMPLE_RATE, "frame_rate": SAMPLE_RATE / engine.frame_size,
             "duration_s": len(pcm) / SAMPLE_RATE, "tokens": tokens}, indent=1) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {output_text} ({e.strerror or e})") from None
    return took


__all__ = ["offline", "run_offline", "SamplingConfig"]
