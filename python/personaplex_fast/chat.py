"""`chat`: a live full-duplex conversation through a microphone and a speaker (PortAudio).

Three threads meet here. PortAudio's input callback pushes each block of microphone
samples into a bounded queue; the main thread takes them, runs the engine
tick (never inside a callback: a tick can take tens of ms and would starve the
device) and pushes the model's audio into a second bounded queue; PortAudio's
output callback pops from it. The callbacks only move samples, so a slow tick shows
up as a queue running dry or full, which is counted and survived, never as a
blocked audio thread.

The microphone drives the clock: every 1920 samples heard make one tick. The first
model frame is preceded by `jitter` frames of silence in the output queue, a cushion
that absorbs the tick's time jitter at the cost of that much latency.
"""

from __future__ import annotations

import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import soxr

from .audio import SAMPLE_RATE
from .engine import Engine, is_text
from .errors import UserError

FRAME_S = 0.08
# How far the engine may fall behind the microphone before blocks are dropped: past
# ~1 s of backlog the conversation is too late to be worth catching up with.
INPUT_BACKLOG_S = 1.0
OUTPUT_QUEUE_FRAMES = 12  # beyond the jitter cushion; more means the speaker clock runs slow
# A mic that delivers nothing for this long is broken or muted at the server level.
INPUT_STALL_S = 3.0
# PortAudio's suggested device latency: 'low' (~9 ms through PulseAudio) costs a Python
# callback every few ms and underflows when a tick holds the GIL; 40 ms does not.
LATENCY_S = 0.04


@dataclass
class ChatStats:
    frames: int = 0
    input_overflows: int = 0  # flagged by PortAudio: the device lost samples
    input_dropped: int = 0  # blocks dropped because the engine fell behind
    output_underflows: int = 0  # flagged by PortAudio: the device played a gap
    output_underruns: int = 0  # callbacks that found the queue empty and played silence
    output_dropped: int = 0  # model frames dropped because the speaker fell behind
    input_peak: float = 0.0  # loudest mic sample: 0 means a muted or disconnected microphone
    tick_s: list[float] = field(default_factory=list)

    def summary(self) -> str:
        ticks = np.array(self.tick_s or [0.0]) * 1000
        return (f"chat summary: frames={self.frames} seconds={self.frames * FRAME_S:.2f} "
                f"input_overflows={self.input_overflows} input_dropped={self.input_dropped} "
                f"output_underflows={self.output_underflows} output_underruns={self.output_underruns} "
                f"output_dropped={self.output_dropped} input_peak={self.input_peak:.3f} "
                f"tick_mean_ms={ticks.mean():.1f} tick_max_ms={ticks.max():.1f}")


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    rate: int  # 24 kHz when the device takes it, else its default rate (resampled)
    channels: int  # 1, or 2 for hardware that only opens in stereo (downmixed / duplicated)


def import_sounddevice():
    try:
        import sounddevice
    except OSError as e:  # raised at import when libportaudio is missing or fails to initialize
        raise UserError(f"cannot load PortAudio ({e}): install libportaudio2 (apt) or portaudio (brew)") from None
    return sounddevice


def pick_device(sd, query: str | None, kind: str) -> Device:
    """kind 'input' or 'output'; query: a PortAudio index or a substring of the name, None = default."""
    if query is not None and query.isdigit():
        query = int(query)
    if query is None and sd.default.device[0 if kind == "input" else 1] < 0:
        raise UserError(f"no audio {kind} device found (PortAudio lists {_listing(sd)}; "
                        "is a sound server running, e.g. PulseAudio?)")
    try:
        info = sd.query_devices(query, kind)
    except (ValueError, sd.PortAudioError) as e:
        reason = str(e).splitlines()[0]
        raise UserError(f"audio {kind} device {query!r} not found ({reason}; PortAudio lists {_listing(sd)})") from None
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    rates = (SAMPLE_RATE, int(info["default_samplerate"]))
    for channels in (1, 2):  # some hardware devices only open in stereo
        for rate in rates:
            try:
                check(device=info["index"], samplerate=rate, channels=channels, dtype="float32")
                return Device(info["index"], info["name"], rate, channels)
            except sd.PortAudioError as e:
                error = e
    raise UserError(f"audio {kind} device {info['name']!r} opens neither at {rates[0]} Hz nor at "
                    f"its default {rates[1]} Hz, mono or stereo ({error})")


def _listing(sd) -> str:
    names = [f"[{i}] {d['name']}" for i, d in enumerate(sd.query_devices())]
    return ", ".join(names) if names else "no devices at all"


class Resampler:
    """Streaming rate conversion, the identity when both rates match."""

    def __init__(self, rate_in: int, rate_out: int):
        self.stream = None if rate_in == rate_out else soxr.ResampleStream(rate_in, rate_out, 1, dtype="float32")

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        return pcm if self.stream is None else self.stream.resample_chunk(pcm)


class Microphone:
    """The input callback: queue a copy of the block, or drop it when the backlog is full.

    Blocks vary in size (blocksize 0), so the bound is in samples: the callback alone
    counts samples queued, the engine thread alone counts samples taken, so neither
    counter is written by two threads."""

    def __init__(self, stats: ChatStats, rate: int):
        self.stats = stats
        self.blocks: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self.max_backlog = round(rate * INPUT_BACKLOG_S)
        self.queued = self.taken = 0

    def callback(self, indata, frames, time_info, status) -> None:
        if status.input_overflow:
            self.stats.input_overflows += 1
        if self.queued - self.taken + frames > self.max_backlog:
            self.stats.input_dropped += 1
            return
        self.blocks.put(indata.mean(axis=1, dtype=np.float32))
        self.queued += frames

    def take(self, timeout: float) -> np.ndarray:
        block = self.blocks.get(timeout=timeout)
        self.taken += len(block)
        return block


class Speaker:
    """The output callback: play queued model audio, silence when there is none."""

    def __init__(self, stats: ChatStats, max_blocks: int):
        self.stats = stats
        self.blocks: queue.Queue[np.ndarray] = queue.Queue(maxsize=max_blocks)
        self.pending = np.zeros(0, np.float32)
        self.started = False  # silence before the first model frame is not an underrun

    def push(self, pcm: np.ndarray) -> None:
        try:
            self.blocks.put_nowait(pcm)
        except queue.Full:
            self.stats.output_dropped += 1

    def callback(self, outdata, frames, time_info, status) -> None:
        if status.output_underflow:
            self.stats.output_underflows += 1
        parts, have = [self.pending], len(self.pending)
        while have < frames:
            try:
                block = self.blocks.get_nowait()
            except queue.Empty:
                if self.started:
                    self.stats.output_underruns += 1
                break
            self.started = True
            parts.append(block)
            have += len(block)
        pcm = np.concatenate(parts)
        outdata.fill(0)
        n = min(frames, len(pcm))
        outdata[:n] = pcm[:n, None]
        self.pending = pcm[n:]


def chat(engine: Engine, decode, input_device: str | None = None, output_device: str | None = None,
         seconds: float | None = None, prompt=None, jitter: int = 2, transcript=sys.stdout,
         log=sys.stderr) -> ChatStats:
    """Run until `seconds` of microphone audio have been answered, or SIGINT (then KeyboardInterrupt
    is raised once the streams are closed and the summary is printed). `prompt`: the prompted LM
    state (Model.prompt) the session starts from, the PersonaPlex phases having run before the
    microphone opens."""
    sd = import_sounddevice()
    mic_dev, spk_dev = pick_device(sd, input_device, "input"), pick_device(sd, output_device, "output")
    stats = ChatStats()
    mic, speaker = Microphone(stats, mic_dev.rate), Speaker(stats, max_blocks=jitter + OUTPUT_QUEUE_FRAMES)
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"chat: microphone [{mic_dev.index}] {mic_dev.name} at {mic_dev.rate} Hz, "
          f"speaker [{spk_dev.index}] {spk_dev.name} at {spk_dev.rate} Hz; Ctrl-C to stop", file=log, flush=True)
    slot = engine.join(prompt)
    try:
        streams = _open_streams(sd, mic_dev, spk_dev, mic, speaker)
        try:
            for s in streams:
                s.start()
            _loop(engine, slot, decode, mic, speaker, mic_dev, spk_dev, stats, stop, seconds, jitter, transcript)
        finally:
            for s in streams:
                s.close(ignore_errors=True)
    finally:
        engine.leave(slot)
        signal.signal(signal.SIGINT, previous)
        print(file=transcript, flush=True)
        print(stats.summary(), file=log, flush=True)
    if stop.is_set():
        raise KeyboardInterrupt
    return stats


def _open_streams(sd, mic_dev: Device, spk_dev: Device, mic: Microphone, speaker: Speaker) -> list:
    streams = []
    try:
        for dev, cls, callback in ((mic_dev, sd.InputStream, mic.callback), (spk_dev, sd.OutputStream, speaker.callback)):
            # blocksize 0 (whatever size the host delivers; the engine re-frames to 80 ms itself):
            # a fixed 80 ms block makes PortAudio's ALSA host API buffer two of them, 160 ms each way.
            streams.append(cls(device=dev.index, samplerate=dev.rate, channels=dev.channels, dtype="float32",
                               blocksize=0, latency=LATENCY_S, callback=callback))
    except sd.PortAudioError as e:
        for s in streams:
            s.close(ignore_errors=True)
        raise UserError(f"cannot open audio device {dev.name!r} at {dev.rate} Hz: {e}") from None
    return streams


def _loop(engine: Engine, slot: int, decode, mic: Microphone, speaker: Speaker, mic_dev: Device,
          spk_dev: Device, stats: ChatStats, stop: threading.Event, seconds: float | None, jitter: int,
          transcript) -> None:
    fs = engine.frame_size
    limit = None if seconds is None else round(seconds / FRAME_S)
    to_model, to_speaker = Resampler(mic_dev.rate, SAMPLE_RATE), Resampler(SAMPLE_RATE, spk_dev.rate)
    batch = np.zeros((engine.slots, fs), np.float32)
    heard = np.zeros(0, np.float32)
    last_block = time.monotonic()
    while not stop.is_set() and (limit is None or stats.frames < limit):
        try:
            block = mic.take(timeout=0.1)
        except queue.Empty:
            if time.monotonic() - last_block > INPUT_STALL_S:
                raise UserError(f"audio input device {mic_dev.name!r} delivered no samples "
                                f"for {INPUT_STALL_S:.0f} s") from None
            continue
        last_block = time.monotonic()
        stats.input_peak = max(stats.input_peak, float(np.abs(block).max(initial=0.0)))
        heard = np.concatenate([heard, to_model(block)])
        while len(heard) >= fs and (limit is None or stats.frames < limit):
            batch[slot], heard = heard[:fs], heard[fs:]
            t0 = time.perf_counter()
            out = engine.tick(batch)
            stats.tick_s.append(time.perf_counter() - t0)
            if stats.frames == 0:
                for _ in range(jitter):
                    speaker.push(np.zeros(round(spk_dev.rate * FRAME_S), np.float32))
            speaker.push(to_speaker(out.pcm[slot]))
            stats.frames += 1
            token = int(out.text[slot])
            if is_text(token) and (piece := decode(token)):
                transcript.write(piece)
                transcript.flush()
