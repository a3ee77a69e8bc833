"""`chat` through a real PortAudio backend: a private PulseAudio daemon with virtual devices.

The daemon has two null sinks: `micfeed`, whose monitor is the default source (the
microphone: espeak-ng speech is played into it with paplay), and `speaker`, the
default sink (its monitor is recorded with parec to hear what the model said).
PortAudio reaches it through its ALSA host API and the ALSA 'pulse' plugin, exactly
as on a desktop. Needs apt packages pulseaudio, pulseaudio-utils, libportaudio2,
libasound2-plugins and espeak-ng (see .ci/run).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from personaplex_fast.chat import ChatStats, Device, Resampler, Speaker, wants_aec
from personaplex_fast.echo import LAG_S, REANCHOR_S, SUSTAIN_S, MicProcessor, Reference, Timeline
from personaplex_fast.tiny import make_tiny

CLI = [sys.executable, "-m", "personaplex_fast.cli", "chat"]
SCRIPTED = [sys.executable, str(Path(__file__).with_name("scripted_chat.py"))]
SPEECH = ("Hello, can you hear me? I would like to talk about the weather in the mountains, "
          "the rivers and the forests, and what we should cook for dinner tonight. "
          "Tell me about your day, and then we can plan the weekend together.")

DEFAULT_PA = """
load-module module-native-protocol-unix auth-anonymous=1 socket={socket}
load-module module-null-sink sink_name=speaker rate=24000 channels=1
load-module module-null-sink sink_name=micfeed rate=24000 channels=1
set-default-sink speaker
set-default-source micfeed.monitor
"""


@pytest.fixture(scope="module")
def pulse(tmp_path_factory):
    """Environment for children that talk to a fresh PulseAudio daemon (killed at the end)."""
    root = tmp_path_factory.mktemp("pulse")
    socket = root / "native"
    (root / "default.pa").write_text(DEFAULT_PA.format(socket=socket))
    env = {**os.environ, "HOME": str(root), "XDG_RUNTIME_DIR": str(root), "PULSE_RUNTIME_PATH": str(root),
           "PULSE_SERVER": f"unix:{socket}"}
    # -n: no default.pa but ours; --exit-idle-time=-1: stay up between tests.
    daemon = subprocess.Popen(
        ["pulseaudio", "--daemonize=no", "--exit-idle-time=-1", "--system=false", "-n",
         "-F", str(root / "default.pa"), "--log-target=stderr"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            if subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode == 0:
                break
            if daemon.poll() is not None:
                pytest.fail(f"pulseaudio exited: {daemon.stderr.read()[-2000:]}")
            time.sleep(0.05)
        else:
            pytest.fail("pulseaudio did not answer within 5 s")
        yield env
    finally:
        daemon.terminate()
        try:
            daemon.wait(5)
        except subprocess.TimeoutExpired:
            daemon.kill()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny"))  # with a tokenizer: the transcript is real text


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), SPEECH], check=True)
    return path


@pytest.fixture
def talking(pulse, speech):
    """Speech looped into the microphone while the test runs."""
    player = subprocess.Popen(["bash", "-c", f"while paplay -d micfeed {speech}; do :; done"],
                              env=pulse, start_new_session=True)
    yield
    os.killpg(player.pid, signal.SIGTERM)
    player.wait()


def _summary(stderr: str) -> dict[str, float]:
    line = next((ln for ln in stderr.splitlines() if ln.startswith("chat summary:")), None)
    assert line is not None, f"no summary line in stderr:\n{stderr}"
    return {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}


@pytest.fixture
def echo_path(pulse):
    """The speaker played back into the microphone 80 ms later and 12 dB down, as a laptop's
    speakers reach its microphone (module-loopback; removed after the test)."""
    def pactl(*args):
        return subprocess.run(["pactl", *args], env=pulse, capture_output=True, text=True, check=True).stdout
    module = pactl("load-module", "module-loopback", "source=speaker.monitor", "sink=micfeed",
                   "latency_msec=80", "source_dont_move=true", "sink_dont_move=true").strip()
    sink_input = re.search(rf"Sink Input #(\d+)\n(?:\t.*\n)*?\tOwner Module: {module}\n",
                           pactl("list", "sink-inputs")).group(1)
    pactl("set-sink-input-volume", sink_input, str(round(65536 * 10 ** (-12 / 60))))  # cubic scale: -12 dB
    yield
    pactl("unload-module", module)


def test_live_conversation_through_pulseaudio(pulse, model, talking, echo_path, tmp_path):
    recording = tmp_path / "speaker.wav"
    parec = subprocess.Popen(["parec", "-d", "speaker.monitor", "--rate=24000", "--channels=1",
                              "--format=s16le", "--file-format=wav", str(recording)], env=pulse)
    try:
        started = time.monotonic()
        run = subprocess.run(CLI + ["--model", str(model), "--seconds", "10",
                                    "--input-device", "pulse", "--output-device", "pulse"],
                             env=pulse, capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        parec.send_signal(signal.SIGINT)  # parec finalizes the wav header on SIGINT
        parec.wait(5)
    print(run.stderr)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    stats = _summary(run.stderr)
    # --seconds counts microphone audio: exactly 125 frames of 80 ms, heard in real time.
    assert stats["frames"] == 125
    assert 9.5 < elapsed < 30
    for key in ("input_overflows", "input_dropped", "output_underflows", "output_underruns", "output_dropped"):
        assert key in stats
    # A 25 ms tick keeps up with 80 ms frames: nothing should be lost on an idle machine,
    # but a loaded CI box may glitch a few times (that is what the counters are for).
    assert stats["input_dropped"] + stats["output_underruns"] <= 10
    assert stats["input_peak"] > 0.05, "espeak-ng speech did not reach the microphone"
    assert len(run.stdout.strip()) > 0, "no transcript printed"
    # Echo cancellation is on by default ('pulse' is not named as a headset), and the status
    # lines give the latency and the ERLE (the model's babble is heard over the speech).
    assert "chat: echo cancellation on (--aec auto" in run.stderr
    status = re.findall(r"chat: latency (\d+) ms = frame 80 \+ input (\d+) \+ tick (\d+) \+ output (\d+); "
                        r"echo reduced (-?[\d.]+) dB", run.stderr)
    assert len(status) == 2, run.stderr  # after 2 s and 7 s
    total, inp, tick, out, erle = map(float, status[-1])
    assert abs(total - (80 + inp + tick + out)) <= 2  # each part rounded
    # The output side holds the 2-frame jitter cushion (160 ms) plus the device's buffer, at
    # most the speaker queue (14 frames) when a loaded machine stalls it; the input side at
    # most the microphone's 1 s backlog.
    assert 160 <= out < 1200 and 0 <= inp < 1100 and 240 < stats["latency_ms"] < 2400, status
    assert erle > 3 and stats["erle_db"] > 3, status

    audio, rate = sf.read(str(recording), dtype="float32")
    assert rate == 24000 and len(audio) > 9 * rate
    # The recording starts before the model loads; the (random) model then speaks
    # continuously, so most of its 10 s must be audible.
    frames = audio[: len(audio) // 1920 * 1920].reshape(-1, 1920)
    loud = np.sqrt(np.mean(frames ** 2, axis=1)) > 0.01
    assert loud.sum() * 0.08 > 7, f"only {loud.sum() * 0.08:.1f} s of the model's audio reached the speaker"


def test_ctrl_c_closes_cleanly(pulse, model, talking):
    proc = subprocess.Popen(CLI + ["--model", str(model)], env=pulse,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the streams are about to open
        if line.startswith("chat: microphone"):
            break
    # The first transcript piece: frames are flowing (a fresh PulseAudio monitor source
    # may take ~1 s to deliver its first samples).
    assert proc.stdout.read(1)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err
    assert _summary(err)["frames"] >= 20  # 2 s of 80 ms frames, and then some


def test_no_audio_device_is_one_line_error(model, tmp_path):
    # No sound server to reach: on a machine without sound hardware (CI) PortAudio then
    # really lists no device at all. (An ALSA_CONFIG_PATH without cards makes PortAudio 19.6 abort.)
    env = {**os.environ, "PULSE_SERVER": f"unix:{tmp_path}/nothing-here", "HOME": str(tmp_path)}
    listed = subprocess.run([sys.executable, "-c", "import sounddevice; print(len(sounddevice.query_devices()))"],
                            env=env, capture_output=True, text=True, timeout=30)
    if listed.stdout.strip() not in ("", "0"):
        pytest.skip(f"this host has sound hardware: PortAudio lists {listed.stdout.strip()} devices without a server")
    run = subprocess.run(CLI + ["--model", str(model), "--seconds", "1"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("personaplex-fast: error: no audio input device found"), lines


def test_unknown_device_is_one_line_error(pulse, model):
    run = subprocess.run(CLI + ["--model", str(model), "--input-device", "no such mic"], env=pulse,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "audio input device 'no such mic' not found" in lines[0], lines


def test_prompted_session(pulse, model, talking):
    # The PersonaPlex voice and text phases run before the microphone opens.
    run = subprocess.run(CLI + ["--model", str(model), "--seconds", "2", "--voice-prompt", "NATF0",
                                "--text-prompt", "You are a wise and friendly teacher."],
                         env=pulse, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert _summary(run.stderr)["frames"] == 25


MODEL_LINES = ("I am the model and I like to talk about mountains, rivers and forests, the weather tomorrow, "
               "what we might cook for dinner, and the long walks we could take on the weekend.")
USER_LINE = "Hello, this is the person at the desk. Can you hear me clearly over there?"


def _speak(text: str, voice: str, path: Path) -> np.ndarray:
    """espeak-ng at 24 kHz, scaled to an RMS of 0.1 while speaking."""
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
    x, rate = sf.read(str(path), dtype="float32")
    x = soxr.resample(x, rate, 24000)
    return 0.1 * x / np.sqrt(np.mean(x[np.abs(x) > 0.01] ** 2))


def _place(seconds: float, parts) -> np.ndarray:
    out = np.zeros(round(seconds * 24000), np.float32)
    for t, x in parts:
        s = round(t * 24000)
        out[s:s + len(x)] = x[:len(out) - s]
    return out


def test_echo_cancelled_and_the_user_kept(pulse, echo_path, tmp_path):
    """A scripted "model" (tests/scripted_chat.py) talks 0-5 s and 8.5-15 s; the user talks
    5.6-8 s alone and 12.3-14.7 s over it. The echo path is module-loopback (80 ms, -12 dB).
    chat --record keeps, side by side, what the microphone heard (what the model would hear
    with --aec off) and what the model heard: the same routed signal without and with AEC."""
    model_voice = _speak(MODEL_LINES, "en", tmp_path / "m.wav")
    user_voice = _speak(USER_LINE, "en-us+f3", tmp_path / "u.wav")[:round(2.4 * 24000)]
    model_pcm = _place(16, [(0, model_voice[:5 * 24000]), (8.5, np.tile(model_voice, 2)[6 * 24000:13 * 24000])])
    user_pcm = _place(16, [(5.6, user_voice), (12.3, user_voice)])
    sf.write(tmp_path / "model.wav", model_pcm, 24000)
    sf.write(tmp_path / "user.wav", user_pcm, 24000, subtype="PCM_16")
    record = tmp_path / "record.wav"
    run = subprocess.run(SCRIPTED + [str(tmp_path / "model.wav"), str(tmp_path / "user.wav"), "16", str(record), "auto"],
                         env=pulse, capture_output=True, text=True, timeout=90)
    print(run.stderr)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert "chat: echo cancellation on" in run.stderr
    m = _echo_measures(record, user_pcm)
    print({k: round(float(v), 3) for k, v in m.items()})
    # The echo comes after its reference (the pairing is causal): by the loopback, the devices'
    # buffers and the pairing's own LAG_S (~85 ms here), well inside what AEC3 searches (~0.5 s).
    assert LAG_S < m["echo_delay_s"] < 0.4, m
    assert m["echo_only_s"] > 3 and m["user_only_s"] > 1, m  # enough of each to measure
    # Far-end energy reduced by >= 20 dB after convergence, in the median 0.5 s window and in
    # 3 of 4: a loaded machine may stall the speaker or PulseAudio's loopback (a gap between
    # the echo and its reference) and the canceller re-converges for a moment, which the
    # energy over the whole run (~50 dB on a quiet machine, printed above) would not forgive.
    assert m["erle_median_db"] >= 20 and m["windows_over_20db"] >= 0.75, m
    assert 0.9 <= m["user_kept"] < 1.1, m  # the user's speech keeps >= 90% of its energy


def _echo_measures(record: Path, user_pcm: np.ndarray) -> dict[str, float]:
    """From chat's --record (microphone, reference, model input), in 10 ms blocks: ERLE where
    only the echo is heard (after 2 s of it; over all of it and per 0.5 s window), the user's
    energy kept where only the user talks, and, for the record, the user's energy in the model
    input during double talk."""
    x, rate = sf.read(str(record), dtype="float32")
    mic, ref, out = x.T
    # Where the scripts landed: the echo's delay behind the reference, the user's track in the
    # microphone (both by cross-correlation), and the processor's own delay (out behind mic).
    seg = slice(rate, 4 * rate)
    echo_delay = _xcorr_lag(mic[seg], ref[seg], rate // 2)
    user_at = _xcorr_lag(mic, user_pcm[:len(mic)], len(mic) // 2, both=True)
    user = np.roll(np.pad(user_pcm, (0, max(0, len(mic) - len(user_pcm))))[:len(mic)], user_at)
    out = out[_xcorr_lag(out, mic, rate // 20):]  # align: the processor delays its output
    n = len(out) // 240
    blocks = lambda v: np.sum(v[:n * 240].reshape(n, 240) ** 2, axis=1)  # noqa: E731
    e_mic, e_out, e_user = blocks(mic), blocks(out), blocks(user)
    echo = np.roll(ref, echo_delay)
    far_on = _dilate(blocks(echo) > 240 * 0.005 ** 2, 5)
    user_on = _dilate(e_user > 240 * 0.005 ** 2, 5)
    converged = np.arange(n) > np.argmax(far_on) + 200
    echo_only = far_on & ~_dilate(user_on, 20) & converged
    user_only = user_on & ~_dilate(far_on, 20)
    both = user_on & far_on & converged
    erle = lambda b: 10 * np.log10(e_mic[b].sum() / max(e_out[b].sum(), 1e-12))  # noqa: E731
    windows = [erle(w) for w in (echo_only & (np.arange(n) // 50 == i) for i in range(n // 50)) if w.sum() >= 25]
    return {"echo_delay_s": echo_delay / rate, "echo_only_s": echo_only.sum() / 100, "user_only_s": user_only.sum() / 100,
            "erle_db": erle(echo_only), "erle_median_db": np.median(windows),
            "windows_over_20db": np.mean(np.array(windows) >= 20),
            "user_kept": e_out[user_only].sum() / e_mic[user_only].sum(),
            "double_talk_user_kept": e_out[both].sum() / e_user[both].sum()}


def _xcorr_lag(a: np.ndarray, b: np.ndarray, most: int, both: bool = False) -> int:
    """The delay of b's content in a, in samples (0..most, or -most..most)."""
    size = 1 << int(np.ceil(np.log2(len(a) + len(b))))
    c = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size)), size)
    lags = np.concatenate([np.arange(0, most + 1), np.arange(-most, 0)]) if both else np.arange(0, most + 1)
    return int(lags[np.argmax(c[lags])])


def _dilate(mask: np.ndarray, blocks: int) -> np.ndarray:
    return np.convolve(mask.astype(float), np.ones(2 * blocks + 1), "same") > 0


def test_speaker_plays_silence_on_underrun_and_counts_it():
    stats = ChatStats()
    speaker = Speaker(stats, max_blocks=2, keep_played=True)
    out = np.ones((1920, 1), np.float32)
    speaker.callback(out, 1920, _Time(10.0), _Status())
    assert not out.any() and stats.output_underruns == 0  # before the first frame: not an underrun
    speaker.push(np.full(1000, 0.5, np.float32), frame=0)
    speaker.callback(out, 1920, _Time(10.08), _Status())
    assert (out[:1000] == 0.5).all() and not out[1000:].any() and stats.output_underruns == 1
    for _ in range(3):
        speaker.push(np.zeros(10, np.float32))
    assert stats.output_dropped == 1
    # What it wrote is the echo reference, stamped with the callback time; frame 0 was handed over then.
    played = [speaker.played.get_nowait() for _ in range(2)]
    assert [t for _, t, _ in played] == [10.0, 10.08] and (played[1][0][:1000] == 0.5).all()
    assert speaker.frame_starts.get_nowait() == (0, 10.08)


def test_timeline_follows_the_earliest_stamps_and_re_anchors_on_lost_samples():
    line = Timeline(1000)  # 10-sample blocks every 10 ms
    for k in range(11):  # every other callback 3 ms late: ignored
        assert abs(line.stamp(1.0 + k * 0.01 + (0.003 if k % 2 else 0.0), 10) - (1.0 + k * 0.01)) < 1e-9
    assert abs(line.stamp(1.11 - 0.002, 10) - 1.108) < 1e-9  # 2 ms early: the anchor moves to it
    # 50 ms of samples lost: the stamps stay 50 ms late; after SUSTAIN_S of them it follows.
    times = [line.stamp(1.118 + 0.05 + k * 0.01, 10) for k in range(round(SUSTAIN_S * 100) + 2)]
    assert abs(times[0] - 1.118) < 1e-9 and abs(times[-1] - (1.168 + (len(times) - 1) * 0.01)) < 1e-9
    assert line.jumps == 1 and REANCHOR_S < 0.05
    # A gap the device reported (PortAudio's over/underflow flag) is taken at once.
    n = line.n
    assert abs(line.stamp(5.0, 10, gap=True) - 5.0) < 1e-9 and line.jumps == 2 and line.t0 == 5.0 - n / 1000


def test_reference_window_is_what_played_at_that_time():
    ref = Reference()
    ref.add(np.arange(2400, dtype=np.float32), 100.0)  # 0.1 s of samples from t = 100 s
    ref.add(np.arange(2400, 4800, dtype=np.float32), 100.1 + 0.003)  # a callback 3 ms late
    window, unknown = ref.window(100.05, 2400)
    assert unknown == 0 and window[0] == 1200 and window[-1] == 3599
    window, unknown = ref.window(100.19, 480)  # runs 10 ms past what was given: zeros, counted
    assert unknown == 240 and window[0] == 4560 and not window[240:].any()


def test_processor_cancels_an_echo_paired_by_callback_times(tmp_path):
    """Offline, on a simulated clock: the speaker is given 10 ms blocks, the microphone hears
    them 50 ms later, 6 dB down, and the user at 3-5 s while the model pauses; blocks are
    stamped as the callbacks would stamp them."""
    voice = _speak(MODEL_LINES, "en", tmp_path / "m.wav")[:6 * 24000]
    voice[round(2.9 * 24000):5 * 24000] = 0  # the model pauses while the user talks
    user = _speak(USER_LINE, "en-us+f3", tmp_path / "u.wav")[:2 * 24000]
    mic = 0.5 * np.concatenate([np.zeros(1200, np.float32), voice[:-1200]])  # 50 ms, -6 dB
    mic[3 * 24000:5 * 24000] += user
    p = MicProcessor(echo=True)
    heard = []
    for i in range(0, len(voice), 240):
        p.reference.add(voice[i:i + 240], 100 + i / 24000 + 0.002 * (i % 7 == 0))  # some callbacks late
        heard.append(p.process(mic[i:i + 240], 100 + i / 24000).out)  # the block's first sample
    out = np.concatenate(heard)[p.delay:]
    e = lambda x, a, b: float(np.sum(x[a * 24000:b * 24000] ** 2))  # noqa: E731
    assert 10 * np.log10(e(mic, 1, 3) / e(out, 1, 3)) > 20  # echo alone: cancelled
    assert e(out, 3, 5) / e(mic, 3, 5) > 0.9  # the user alone (the model silent): kept
    assert p.missing == 0 and 180 < p.delay < 300 and LAG_S < 0.05


def test_noise_suppression_alone():
    p = MicProcessor(echo=False, noise_suppression=True)
    noise = (np.random.default_rng(0).standard_normal(2 * 24000) * 0.01).astype(np.float32)
    out = np.concatenate([p.process(noise[i:i + 1000], i / 24000).out for i in range(0, len(noise), 1000)])
    assert len(out) == len(noise) // 240 * 240  # whole 10 ms blocks; the rest waits for more
    assert np.sum(out[24000:] ** 2) < 0.5 * np.sum(noise[24000:len(out)] ** 2)


def test_aec_auto_is_off_for_headsets_only():
    dev = lambda name: Device(0, name, 48000, 1)  # noqa: E731
    assert wants_aec("auto", dev("pulse"), dev("pulse"))[0]
    assert wants_aec("auto", dev("MacBook Pro Microphone"), dev("MacBook Pro Speakers"))[0]
    assert not wants_aec("auto", dev("MacBook Pro Microphone"), dev("External Headphones"))[0]
    assert not wants_aec("auto", dev("AirPods Pro"), dev("AirPods Pro"))[0]
    assert not wants_aec("auto", dev("Logitech USB Headset Mono"), dev("pulse"))[0]
    assert wants_aec("on", dev("AirPods Pro"), dev("AirPods Pro"))[0]
    assert not wants_aec("off", dev("pulse"), dev("pulse"))[0]


def test_resampler_streams_device_rate_to_24k():
    to_model = Resampler(48000, 24000)
    tone = np.sin(2 * np.pi * 440 * np.arange(48000) / 48000).astype(np.float32)
    out = np.concatenate([to_model(tone[i:i + 3840]) for i in range(0, 48000, 3840)])
    assert 24000 - 1200 < len(out) <= 24000  # soxr holds back its filter delay (~30 ms) until the end
    assert abs(np.abs(out[2000:]).max() - 1.0) < 0.01


class _Status:
    input_overflow = output_underflow = False


class _Time:
    def __init__(self, t: float):
        self.currentTime = t
