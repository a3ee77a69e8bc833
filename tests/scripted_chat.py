"""`chat` with a scripted engine: the "model" says a recording, so a test knows what the speaker
plays and when it is silent (the tiny random model babbles without a pause).

    python tests/scripted_chat.py MODEL.wav NEAR.wav SECONDS RECORD.wav AEC

MODEL.wav and NEAR.wav are 24 kHz mono. On its first tick the engine starts NEAR.wav into the
microphone's null sink (paplay -d micfeed), so the two scripts start within ~0.1 s of each other.
"""

import subprocess
import sys

import numpy as np
import soundfile as sf

from personaplex_fast.chat import chat
from personaplex_fast.engine import UNGENERATED, TickOutput


class ScriptedEngine:
    slots, frame_size = 1, 1920

    def __init__(self, pcm: np.ndarray, near: str):
        self.pcm, self.near, self.frame, self.player = pcm, near, 0, None

    def join(self, prompt=None) -> int:
        return 0

    def leave(self, slot: int) -> None:
        pass

    def tick(self, batch: np.ndarray) -> TickOutput:
        if self.player is None:
            self.player = subprocess.Popen(["paplay", "-d", "micfeed", self.near])
        fs = self.frame_size
        out = np.zeros((1, fs), np.float32)
        chunk = self.pcm[self.frame * fs:(self.frame + 1) * fs]
        out[0, :len(chunk)] = chunk
        self.frame += 1
        return TickOutput(out, np.array([UNGENERATED]))


def main() -> None:
    model_wav, near_wav, seconds, record, aec = sys.argv[1:6]
    pcm, rate = sf.read(model_wav, dtype="float32")
    assert rate == 24000
    engine = ScriptedEngine(pcm, near_wav)
    try:
        chat(engine, lambda token: "", input_device="pulse", output_device="pulse", seconds=float(seconds),
             aec=aec, record=record)
    finally:
        if engine.player is not None:
            engine.player.terminate()
            engine.player.wait(10)


if __name__ == "__main__":
    main()
