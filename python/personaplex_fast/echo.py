"""Echo cancellation for `chat`: WebRTC's audio processing module (AEC3, optionally its noise
suppressor) between the microphone and the model, through the `pywebrtc-audio` binding.

The echo canceller's reference is what the speaker callback wrote, silence and underruns
included. Both streams are put on PortAudio's stream clock by their callback times (when the
device took or gave a block), and each 10 ms of microphone audio is paired with the reference
handed to the device LAG_S before it. The echo of a sample therefore reaches the canceller
after the sample itself by the output latency + the acoustic path + the input latency + LAG_S,
whatever the devices report: AEC3 only cancels an echo that comes after its reference, and
finds that delay itself (up to ~0.5 s). The devices' own DAC / ADC stamps would pair the
two more tightly, but through ALSA's PulseAudio plugin the capture stamps were off by
~250 ms in one run of three, which put the echo before its reference and cancelled nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .audio import SAMPLE_RATE
from .errors import UserError

BLOCK = SAMPLE_RATE // 100  # AEC3 works on 10 ms blocks
# The reference for a microphone block was handed to the speaker this long before it: by then
# an output callback has run even when it is a little late (it runs every ~10 ms).
LAG_S = 0.04
# Callback times are late by however long a callback waited, never early. A stream's times
# follow its earliest stamps, and move later only when the stamps stay more than REANCHOR_S
# late for SUSTAIN_S: the device lost or skipped samples.
REANCHOR_S = 0.01
SUSTAIN_S = 0.3
KEEP_S = 2.0  # reference kept; the microphone is dropped when it falls 1 s behind
ERLE_WINDOW_S = 5.0
# Reference blocks below -50 dBFS carry too little echo for the ERLE to mean anything.
ACTIVE_RMS = 10 ** (-50 / 20)


class Timeline:
    """Stream-clock times of a contiguous stream of samples: sample n at t0 + n / rate."""

    def __init__(self, rate: int):
        self.rate, self.t0, self.n, self.jumps = rate, None, 0, 0
        self.late_from: int | None = None  # sample count since which the stamps are late
        self.late_t0 = 0.0  # the earliest anchor those late stamps gave

    def stamp(self, t: float, count: int, gap: bool = False) -> float:
        """`count` new samples whose first one the callback stamped t; returns its time.
        gap: the device reported lost or unplayed samples before these (PortAudio's
        over/underflow flags), so the stamp is taken at once."""
        t0 = t - self.n / self.rate
        if gap and self.t0 is not None and t0 > self.t0 + REANCHOR_S:
            self.t0, self.late_from = t0, None
            self.jumps += 1
        elif self.t0 is None or t0 < self.t0:
            self.jumps += self.t0 is not None and t0 < self.t0 - REANCHOR_S
            self.t0, self.late_from = t0, None
        elif t0 > self.t0 + REANCHOR_S:
            if self.late_from is None:
                self.late_from, self.late_t0 = self.n, t0
            self.late_t0 = min(self.late_t0, t0)
            if self.n - self.late_from >= SUSTAIN_S * self.rate:
                self.t0, self.late_from = self.late_t0, None
                self.jumps += 1
        else:
            self.late_from = None
        first = self.t0 + self.n / self.rate
        self.n += count
        return first


class Reference:
    """What the speaker was given, at 24 kHz, on the stream clock (see Timeline)."""

    def __init__(self):
        self.pcm = np.zeros(0, np.float32)
        self.timeline = Timeline(SAMPLE_RATE)
        self.dropped = 0  # samples trimmed off the front of pcm

    def add(self, pcm: np.ndarray, t: float, gap: bool = False) -> None:
        self.timeline.stamp(t, len(pcm), gap)
        self.pcm = np.concatenate([self.pcm, pcm])
        excess = len(self.pcm) - round(KEEP_S * SAMPLE_RATE)
        if excess > SAMPLE_RATE // 2:
            self.pcm, self.dropped = self.pcm[excess:], self.dropped + excess

    def window(self, t: float, n: int) -> tuple[np.ndarray, int]:
        """The n samples given from time t on, and how many of them the speaker had not been
        given yet (zeros, like those from before it started)."""
        out = np.zeros(n, np.float32)
        if self.timeline.t0 is None:
            return out, 0
        start = round((t - self.timeline.t0) * SAMPLE_RATE) - self.dropped
        lo, hi = max(start, 0), min(start + n, len(self.pcm))
        if hi > lo:
            out[lo - start:hi - start] = self.pcm[lo:hi]
        return out, min(n, max(0, start + n - max(start, len(self.pcm))))


@dataclass
class Processed:
    out: np.ndarray  # what the model hears
    t: float  # stream-clock time of out[0] (the microphone's callback time, less the processor's delay)
    mic: np.ndarray  # the microphone blocks that went in
    reference: np.ndarray  # the reference paired with them


class MicProcessor:
    """The microphone's way to the model: AEC3 against the speaker's audio and/or noise
    suppression, on whole 10 ms blocks at 24 kHz. `process` holds back a partial block."""

    def __init__(self, echo: bool = True, noise_suppression: bool = False):
        try:
            from pywebrtc_audio import AudioProcessor
        except ImportError:
            raise UserError("echo cancellation needs pywebrtc-audio: pip install pywebrtc-audio "
                            "(or run chat with --aec off)") from None
        def make():
            return AudioProcessor(sample_rate=SAMPLE_RATE, echo_cancellation=echo, noise_suppression=noise_suppression)

        self.echo = echo
        self.apm = make()
        self.delay = _measure_delay(make(), echo)
        self.reference = Reference()
        self.pending = np.zeros(0, np.float32)
        self.pending_t = 0.0  # stream-clock time of pending[0]
        self.missing = 0  # blocks processed before the speaker had been given their reference
        # (microphone energy, output energy) of each of the last blocks; zeros where nothing played
        self.energy: deque[tuple[float, float]] = deque(maxlen=round(ERLE_WINDOW_S * 100))

    def process(self, pcm: np.ndarray, t: float) -> Processed:
        """pcm: 24 kHz microphone samples from time t on (contiguous with the last call's)."""
        if not len(self.pending):
            self.pending_t = t
        self.pending = np.concatenate([self.pending, pcm])
        n = len(self.pending) // BLOCK * BLOCK
        mic, self.pending = self.pending[:n], self.pending[n:]
        t0, self.pending_t = self.pending_t, self.pending_t + n / SAMPLE_RATE
        if not self.echo:
            out = self.apm.process(mic) if n else mic
            return Processed(out, t0 - self.delay / SAMPLE_RATE, mic, np.zeros_like(mic))
        reference, unknown = self.reference.window(t0 - LAG_S, n)
        self.missing += -(-unknown // BLOCK)
        out = self.apm.process(mic, reference) if n else mic
        energy = lambda x: np.sum(x.reshape(-1, BLOCK) ** 2, axis=1)  # noqa: E731
        active = energy(reference) > BLOCK * ACTIVE_RMS ** 2
        self.energy.extend(zip(energy(mic) * active, energy(out) * active))
        return Processed(out, t0 - self.delay / SAMPLE_RATE, mic, reference)

    def erle_db(self) -> float | None:
        """Echo return loss enhancement over the last ERLE_WINDOW_S: microphone energy over
        output energy in the blocks where the speaker played something (None: it played nothing).
        It drops while someone talks over the model: their voice is meant to pass."""
        mic, out = np.sum(np.array(self.energy).reshape(-1, 2), axis=0)
        if mic < 1e-9:
            return None
        return float(10 * np.log10(mic / max(out, 1e-12)))


def _measure_delay(apm, echo: bool) -> int:
    """Samples the processor's output lags its input (its band split and resampling), measured on
    a fresh instance with noise, for the latency figure."""
    x = (np.random.default_rng(0).standard_normal(SAMPLE_RATE // 4) * 0.1).astype(np.float32)
    y = apm.process(x, np.zeros_like(x)) if echo else apm.process(x)
    lags = range(0, 3 * BLOCK)
    return max(lags, key=lambda d: float(y[d:] @ x[:len(x) - d]))
