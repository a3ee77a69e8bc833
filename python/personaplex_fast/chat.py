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

Without headphones the microphone hears the model: echo.py cancels that echo before the
model hears it, with what the speaker callback wrote as the reference. Both callbacks
stamp their blocks with their callback times, which with the streams' reported latencies
also give the latency figure: from a sound reaching the microphone to the model's reply
to it leaving the speaker.
"""

from __future__ import annotations

import queue
import re
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import soxr

from .audio import SAMPLE_RATE
from .echo import MicProcessor, Timeline
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
# Names that say the sound stays in the user's ears: no echo to cancel (--aec auto).
HEADSET = re.compile(r"head(set|phone)|ear(phone|bud|pod)|airpods|buds\b|hands-?free", re.IGNORECASE)
STATUS_FIRST, STATUS_EVERY = 25, 62  # frames: a status line after 2 s, then every 5 s


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
    # (input, tick, output) seconds of the last frames that reached the speaker: see latency()
    latency_s: deque = field(default_factory=lambda: deque(maxlen=STATUS_EVERY))
    aec: bool = False
    erle_db: float | None = None  # None: no model audio to cancel in the last 5 s
    unreferenced: int = 0  # 10 ms blocks echo-cancelled without their whole reference (late speaker)

    def latency(self) -> tuple[float, float, float, float] | None:
        """Median total, input, tick and output latency in ms over the last frames. Total =
        the frame (its first sample waits for its last) + input (from the frame's last sample
        at the ADC to the tick: device buffering, queueing, echo cancellation) + the tick +
        output (from the tick to the reply's first sample at the DAC: the jitter cushion and
        device buffering). The devices' part is their latency as the streams report it."""
        if not self.latency_s:
            return None
        inp, tick, out = np.median(np.array(self.latency_s), axis=0) * 1000
        return FRAME_S * 1000 + inp + tick + out, inp, tick, out

    def status(self) -> str:
        lat = self.latency()
        text = ("latency not measured yet" if lat is None else
                f"latency {lat[0]:.0f} ms = frame {FRAME_S * 1000:.0f} + input {lat[1]:.0f} "
                f"+ tick {lat[2]:.0f} + output {lat[3]:.0f}")
        if self.aec:
            text += ("; no model audio to cancel in the last 5 s" if self.erle_db is None else
                     f"; echo reduced {self.erle_db:.1f} dB (ERLE, last 5 s)")
        return text

    def summary(self) -> str:
        ticks = np.array(self.tick_s or [0.0]) * 1000
        lat = self.latency()
        return (f"chat summary: frames={self.frames} seconds={self.frames * FRAME_S:.2f} "
                f"input_overflows={self.input_overflows} input_dropped={self.input_dropped} "
                f"output_underflows={self.output_underflows} output_underruns={self.output_underruns} "
                f"output_dropped={self.output_dropped} input_peak={self.input_peak:.3f} "
                f"tick_mean_ms={ticks.mean():.1f} tick_max_ms={ticks.max():.1f}"
                + ("" if lat is None else f" latency_ms={lat[0]:.0f} input_ms={lat[1]:.0f} output_ms={lat[3]:.0f}")
                + ("" if self.erle_db is None else f" erle_db={self.erle_db:.1f} unreferenced={self.unreferenced}"))


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
    """The input callback: queue a copy of the block with its callback time (when the device
    handed over its last sample), or drop it when the backlog is full.

    Blocks vary in size (blocksize 0), so the bound is in samples: the callback alone
    counts samples queued, the engine thread alone counts samples taken, so neither
    counter is written by two threads."""

    def __init__(self, stats: ChatStats, rate: int):
        self.stats = stats
        # (block, callback time, samples lost before it)
        self.blocks: queue.SimpleQueue[tuple[np.ndarray, float, bool]] = queue.SimpleQueue()
        self.max_backlog = round(rate * INPUT_BACKLOG_S)
        self.lost = False  # a block dropped here: the next one starts after a gap
        self.queued = self.taken = 0

    def callback(self, indata, frames, time_info, status) -> None:
        if status.input_overflow:
            self.stats.input_overflows += 1
        if self.queued - self.taken + frames > self.max_backlog:
            self.stats.input_dropped += 1
            self.lost = True
            return
        gap = self.lost or bool(status.input_overflow)
        self.blocks.put((indata.mean(axis=1, dtype=np.float32), time_info.currentTime, gap))
        self.queued += frames
        self.lost = False

    def take(self, timeout: float) -> tuple[np.ndarray, float, bool]:
        block, t, gap = self.blocks.get(timeout=timeout)
        self.taken += len(block)
        return block, t, gap


class Speaker:
    """The output callback: play queued model audio, silence when there is none. It reports
    what it wrote with its callback time (`played`, the echo canceller's reference, when
    `keep_played`) and when each model frame was handed over (`frame_starts`: frame, time)."""

    def __init__(self, stats: ChatStats, max_blocks: int, rate: int = SAMPLE_RATE, keep_played: bool = False):
        self.stats, self.rate = stats, rate
        self.blocks: queue.Queue[tuple[np.ndarray, int]] = queue.Queue(maxsize=max_blocks)
        self.pending = np.zeros(0, np.float32)
        self.started = False  # silence before the first model frame is not an underrun
        self.keep_played = keep_played
        self.played: queue.SimpleQueue[tuple[np.ndarray, float, bool]] = queue.SimpleQueue()
        self.frame_starts: queue.SimpleQueue[tuple[int, float]] = queue.SimpleQueue()

    def push(self, pcm: np.ndarray, frame: int = -1) -> None:
        """frame: the model frame this is (for the latency figure), -1 for the silence cushion."""
        try:
            self.blocks.put_nowait((pcm, frame))
        except queue.Full:
            self.stats.output_dropped += 1

    def callback(self, outdata, frames, time_info, status) -> None:
        if status.output_underflow:
            self.stats.output_underflows += 1
        t = time_info.currentTime
        parts, have = [self.pending], len(self.pending)
        while have < frames:
            try:
                block, frame = self.blocks.get_nowait()
            except queue.Empty:
                if self.started:
                    self.stats.output_underruns += 1
                break
            self.started = True
            if frame >= 0:
                self.frame_starts.put((frame, t + have / self.rate))
            parts.append(block)
            have += len(block)
        pcm = np.concatenate(parts)
        outdata.fill(0)
        n = min(frames, len(pcm))
        outdata[:n] = pcm[:n, None]
        self.pending = pcm[n:]
        if self.keep_played:
            self.played.put((outdata[:, 0].copy(), t, bool(status.output_underflow)))


def wants_aec(mode: str, mic_dev: Device, spk_dev: Device) -> tuple[bool, str]:
    """--aec on/off, or auto: on unless a device's name says headset or headphones (a name
    like PulseAudio's 'pulse' or 'default' says nothing about what is plugged in)."""
    if mode != "auto":
        return mode == "on", f"--aec {mode}"
    named = [d.name for d in (mic_dev, spk_dev) if HEADSET.search(d.name)]
    if named:
        return False, f"--aec auto: {named[0]!r} is a headset"
    return True, "--aec auto: no headset in the device names; use --aec off with headphones"


def chat(engine: Engine, decode, input_device: str | None = None, output_device: str | None = None,
         seconds: float | None = None, prompt=None, jitter: int = 2, aec: str = "auto",
         noise_suppression: bool = False, record: str | None = None, transcript=sys.stdout,
         log=sys.stderr) -> ChatStats:
    """Run until `seconds` of microphone audio have been answered, or SIGINT (then KeyboardInterrupt
    is raised once the streams are closed and the summary is printed). `prompt`: the prompted LM
    state (Model.prompt) the session starts from, the PersonaPlex phases having run before the
    microphone opens. aec: 'on', 'off' or 'auto' (see wants_aec). record: a wav path for three
    24 kHz channels: the microphone, the echo reference paired with it, and what the model heard."""
    sd = import_sounddevice()
    mic_dev, spk_dev = pick_device(sd, input_device, "input"), pick_device(sd, output_device, "output")
    echo, why = wants_aec(aec, mic_dev, spk_dev)
    processor = MicProcessor(echo, noise_suppression) if echo or noise_suppression else None
    stats = ChatStats(aec=echo)
    mic = Microphone(stats, mic_dev.rate)
    speaker = Speaker(stats, max_blocks=jitter + OUTPUT_QUEUE_FRAMES, rate=spk_dev.rate, keep_played=echo)
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"chat: microphone [{mic_dev.index}] {mic_dev.name} at {mic_dev.rate} Hz, "
          f"speaker [{spk_dev.index}] {spk_dev.name} at {spk_dev.rate} Hz; Ctrl-C to stop", file=log, flush=True)
    print(f"chat: echo cancellation {'on' if echo else 'off'} ({why}), noise suppression "
          f"{'on' if noise_suppression else 'off'}", file=log, flush=True)
    recording = None if record is None else _open_recording(record)
    slot = engine.join(prompt)
    try:
        streams = _open_streams(sd, mic_dev, spk_dev, mic, speaker)
        try:
            for s in streams:
                s.start()
            conv = Conversation(engine, slot, decode, speaker, mic_dev, spk_dev, stats, processor, recording,
                                streams, jitter=jitter, transcript=transcript, log=log)
            _loop(conv, mic, mic_dev, stats, stop, seconds)
        finally:
            for s in streams:
                s.close(ignore_errors=True)
    finally:
        engine.leave(slot)
        signal.signal(signal.SIGINT, previous)
        if recording is not None:
            recording.close()
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


def _open_recording(path: str) -> sf.SoundFile:
    try:
        return sf.SoundFile(path, "w", SAMPLE_RATE, 3, "FLOAT")
    except (OSError, RuntimeError) as e:  # soundfile's LibsndfileError is a RuntimeError
        raise UserError(f"cannot write the recording {path}: {str(e).splitlines()[0]}") from None


def _loop(conv: Conversation, mic: Microphone, mic_dev: Device, stats: ChatStats, stop: threading.Event,
          seconds: float | None) -> None:
    limit = None if seconds is None else round(seconds / FRAME_S)
    last_block = time.monotonic()
    while not stop.is_set() and (limit is None or stats.frames < limit):
        try:
            block, t, gap = mic.take(timeout=0.1)
        except queue.Empty:
            if time.monotonic() - last_block > INPUT_STALL_S:
                raise UserError(f"audio input device {mic_dev.name!r} delivered no samples "
                                f"for {INPUT_STALL_S:.0f} s") from None
            continue
        last_block = time.monotonic()
        stats.input_peak = max(stats.input_peak, float(np.abs(block).max(initial=0.0)))
        conv.hear(block, t, gap)
        while conv.ready() and (limit is None or stats.frames < limit):
            conv.tick()


class Conversation:
    """The engine thread's side: microphone blocks -> (echo cancellation) -> 80 ms ticks -> the
    speaker, with the times that make the latency figure."""

    def __init__(self, engine: Engine, slot: int, decode, speaker: Speaker, mic_dev: Device, spk_dev: Device,
                 stats: ChatStats, processor: MicProcessor | None, recording, streams, jitter: int, transcript, log):
        self.engine, self.slot, self.decode, self.speaker = engine, slot, decode, speaker
        self.stats, self.processor, self.recording = stats, processor, recording
        # PortAudio's stream clock, the callbacks' one; the devices' latencies as the streams report them
        self.clock = lambda: streams[0].time
        self.in_latency, self.out_latency = streams[0].latency, streams[1].latency
        self.jitter, self.transcript, self.log, self.spk_rate = jitter, transcript, log, spk_dev.rate
        self.to_model, self.to_speaker = Resampler(mic_dev.rate, SAMPLE_RATE), Resampler(SAMPLE_RATE, spk_dev.rate)
        self.to_reference = Resampler(spk_dev.rate, SAMPLE_RATE)
        self.captured = Timeline(SAMPLE_RATE)  # when the microphone's 24 kHz samples were handed over
        self.batch = np.zeros((engine.slots, engine.frame_size), np.float32)
        self.heard = np.zeros(0, np.float32)
        self.heard_t = 0.0  # handover time of heard[0]
        self.ticks: dict[int, tuple[float, float, float]] = {}  # frame -> (last sample's time, tick start, end)

    def hear(self, block: np.ndarray, t: float, gap: bool = False) -> None:
        """block: what the input callback got at time t (its last sample); gap: samples were lost before it."""
        pcm = self.to_model(block)
        # The resampled samples end where the block ends (the resampler's few ms are ignored).
        t = self.captured.stamp(t - len(pcm) / SAMPLE_RATE, len(pcm), gap)
        if self.processor is not None:
            self._take_reference()
            p = self.processor.process(pcm, t)
            pcm, t = p.out, p.t
            if self.recording is not None:
                self.recording.write(np.stack([p.mic, p.reference, p.out], axis=1))
            if self.processor.echo:
                self.stats.erle_db, self.stats.unreferenced = self.processor.erle_db(), self.processor.missing
        elif self.recording is not None:
            self.recording.write(np.stack([pcm, np.zeros_like(pcm), pcm], axis=1))
        if len(pcm):
            self.heard_t = t - len(self.heard) / SAMPLE_RATE
            self.heard = np.concatenate([self.heard, pcm])

    def _take_reference(self) -> None:
        while True:
            try:
                pcm, t, gap = self.speaker.played.get_nowait()
            except queue.Empty:
                return
            self.processor.reference.add(self.to_reference(pcm), t, gap)

    def ready(self) -> bool:
        return len(self.heard) >= self.engine.frame_size

    def tick(self) -> None:
        fs, stats = self.engine.frame_size, self.stats
        self.batch[self.slot], self.heard = self.heard[:fs], self.heard[fs:]
        last = self.heard_t + (fs - 1) / SAMPLE_RATE
        self.heard_t += fs / SAMPLE_RATE
        start, t0 = self.clock(), time.perf_counter()
        out = self.engine.tick(self.batch)
        stats.tick_s.append(time.perf_counter() - t0)
        self.ticks[stats.frames] = (last, start, self.clock())
        if stats.frames == 0:
            for _ in range(self.jitter):
                self.speaker.push(np.zeros(round(self.spk_rate * FRAME_S), np.float32))
        self.speaker.push(self.to_speaker(out.pcm[self.slot]), stats.frames)
        stats.frames += 1
        token = int(out.text[self.slot])
        if is_text(token) and (piece := self.decode(token)):
            self.transcript.write(piece)
            self.transcript.flush()
        self._measure()
        if stats.frames >= STATUS_FIRST and (stats.frames - STATUS_FIRST) % STATUS_EVERY == 0:
            # On a terminal the transcript is mid-line: start the status on a line of its own.
            lead = "\n" if self.log.isatty() else ""
            print(f"{lead}chat: {stats.status()}", file=self.log, flush=True)

    def _measure(self) -> None:
        while True:
            try:
                frame, given = self.speaker.frame_starts.get_nowait()
            except queue.Empty:
                break
            if (t := self.ticks.pop(frame, None)) is not None:
                last, start, end = t
                self.stats.latency_s.append((start - last + self.in_latency, end - start,
                                             given + self.out_latency - end))
        for frame in [f for f in self.ticks if f < self.stats.frames - 4 * STATUS_EVERY]:
            del self.ticks[frame]  # dropped by a full speaker queue: never played
