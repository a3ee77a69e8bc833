"""The web page end to end: two headless Chromium tabs talk to one server at once, and a
client of PersonaPlex's own protocol (official_client.py) talks beside a tab.

Chromium's fake microphone plays an espeak-ng recording; the page reports its counters
in `window.personaplex`, read through the DevTools protocol (a few CDP calls over a
websocket). Set PERSONAPLEX_SCREENSHOT=path.png to keep a screenshot of a live page.
"""

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import aiohttp
import numpy as np
import pytest

from official_client import chat_url, converse

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Tab:
    """A page's DevTools websocket: just enough CDP to evaluate and screenshot."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=30)
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]

    async def evaluate(self, expression: str):
        return (await self.call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")


def start_chromium(profile, wav) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
         f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=900,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
        time.sleep(0.1)
    return proc, int(port_file.read_text().split()[0])


def open_tab(devtools_port: int, url: str) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{devtools_port}/json/new?{urllib.parse.quote(url, safe='')}",
                                 method="PUT")
    with urllib.request.urlopen(req) as r:
        return json.load(r)["webSocketDebuggerUrl"]


def close_tab(devtools_port: int, tab: str) -> None:
    """Close a tab (its session with it): the next test starts with the server's slots free."""
    with urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json/close/{tab.rsplit('/', 1)[1]}"):
        pass


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Hello there. Could you tell me what the weather "
                    "will be like tomorrow? I would like to go hiking in the mountains."], check=True)
    return path


@pytest.fixture(scope="module")
def chromium(speech_wav, tmp_path_factory):
    """A headless Chromium whose microphone plays `speech_wav`; yields its DevTools port."""
    assert CHROMIUM, "needs chromium: apt-get install chromium (.ci/run installs it)"
    proc, port = start_chromium(tmp_path_factory.mktemp("profile"), speech_wav)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_two_pages_talk_at_once(tiny_server, chromium, tmp_path):
    urls = [open_tab(chromium, f"{tiny_server}/?autostart"),
            open_tab(chromium, f"{tiny_server}/?autostart&voice=NATM1&prompt=You+enjoy+a+good+chat.")]
    results, shot = asyncio.run(watch(urls, want_frames=40, timeout=30))
    for url in urls:
        close_tab(chromium, url)
    (tmp_path / "page.png").write_bytes(shot)
    if os.environ.get("PERSONAPLEX_SCREENSHOT"):
        shutil.copy(tmp_path / "page.png", os.environ["PERSONAPLEX_SCREENSHOT"])
    for r in results:
        print(r["processing"], r["latency"])
        assert r["error"] == "" and r["state"] == "live", r
        assert r["sent"] >= 30 and r["heard"] >= 10, r  # the fake microphone's speech went out
        assert r["received"] >= 40 and r["audible"] >= 10, r  # the model's audio came back
        assert r["tokens"] >= 1 and r["text"].strip(), r  # and so did its transcript
        # As Ogg-Opus both ways: a few hundred bytes a frame, where float32 PCM is 7680.
        assert 0 < r["bytesOut"] / r["sent"] < 1000 and 0 < r["bytesIn"] / r["received"] < 1000, r
        # The browser's echo cancellation, noise suppression and auto gain were asked for and
        # applied; the page measured its round trip (parts: see app.js).
        assert r["processing"] == {"echoCancellation": True, "noiseSuppression": True, "autoGainControl": True}, r
        lat = r["latency"]
        assert lat and lat["total"] == lat["frame"] + lat["server"] + lat["playback"] + lat["devices"], r
        assert 0 < lat["server"] < 1000 and 0 <= lat["playback"] < 1000 and lat["total"] > 80, r


@pytest.fixture(scope="module")
def speech_10s(tmp_path_factory):
    from personaplex_fast.audio import read_audio

    path = tmp_path_factory.mktemp("speech") / "long.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Good morning! I am planning a trip to the mountains next "
                    "week and I would love some advice. What should I pack, and which trails would you "
                    "recommend for a beginner who enjoys long walks and quiet lakes?"], check=True)
    pcm = read_audio(path)
    assert len(pcm) >= 10 * 24000
    return pcm[: 10 * 24000]


def test_the_official_protocol_beside_the_page(tiny_server, chromium, speech_10s):
    """NVIDIA's protocol at /api/chat: 10 s of speech as Ogg-Opus with a voice and a text
    prompt; the handshake comes once both prompts have run (the server logs that before
    it sends the byte), then Opus audio at the tick rate and text pieces, while a page
    talks in the same batch."""
    log = lambda: open(tiny_server.log).read()  # noqa: E731
    prompt = "You are a wise and friendly teacher."
    url = chat_url(tiny_server, voice="NATM1.pt", prompt=prompt, seed=7)

    async def both():
        async with aiohttp.ClientSession() as http:
            page_url = open_tab(chromium, f"{tiny_server}/?autostart&voice=VARF2")
            page = await http.ws_connect(page_url)
            tab = Tab(page)
            deadline = time.monotonic() + 30
            while (await tab.evaluate("(window.personaplex || {}).state")) != "live":
                assert time.monotonic() < deadline, await tab.evaluate("JSON.stringify(window.personaplex)")
                await asyncio.sleep(0.2)
            got = await converse(url, speech_10s, on_handshake=log)
            page_stats = json.loads(await tab.evaluate("JSON.stringify(window.personaplex)"))
            await page.close()
            close_tab(chromium, page_url)
            return got, page_stats

    got, page = asyncio.run(both())
    assert got.error is None and got.handshake_at is not None, got.error
    # The log line the server writes before the handshake byte: both prompts ran (the
    # voice's frames, spacers, 11 text tokens), and the page's session was in the batch.
    joined = [line for line in got.log_at_handshake.splitlines() if "joined" in line][-1]  # the latest join
    assert f"at /api/chat, prompts ran: voice=NATM1 prompt={len(prompt)} chars" in joined, joined
    assert "(2/3)" in joined, joined  # with the page's session
    frames = int(joined.split(" frames")[0].rsplit(" ", 1)[1])
    assert frames > 20, joined  # the voice's recorded frames, the spacers and the text's tokens
    # Opus audio at the tick rate (a 1920-sample frame per message) for the 10 s and the tail.
    times = np.array([t for t, _ in got.audio])
    sizes = {len(pcm) for _, pcm in got.audio}
    assert sizes == {1920}, sizes
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert len(times) >= 0.9 * 10 / 0.08 and 11.5 < rate < 13.5 and np.diff(times).max() < 0.5, (len(times), rate)
    assert max(np.abs(pcm).max() for _, pcm in got.audio) > 1e-3  # the model spoke
    assert got.text and all(t and "\u2581" not in t for t in got.text), got.text
    assert page["error"] == "" and page["received"] >= 40 and page["audible"] >= 10, page


# The worklet in an OfflineAudioContext at 48 and 44.1 kHz: a 1 kHz tone in must come out
# as 24 kHz frames of a 1 kHz tone, and 0.8 s of a 300 Hz tone at 24 kHz must play as such.
RESAMPLE_PROBE = """(async () => {
  const crossings = (x) => { let n = 0; for (let i = 1; i < x.length; i++) n += x[i - 1] < 0 && x[i] >= 0; return n; };
  const out = [];
  for (const rate of [48000, 44100]) {
    const ctx = new OfflineAudioContext(1, rate, rate);
    await ctx.audioWorklet.addModule("worklet.js");
    const node = new AudioWorkletNode(ctx, "duplex", { numberOfInputs: 1, numberOfOutputs: 1,
      outputChannelCount: [1], processorOptions: { rate: 24000, frameSize: 1920, prebufferFrames: 2 } });
    const frames = [];
    node.port.onmessage = (e) => frames.push(e.data);
    for (let k = 0; k < 10; k++) {
      node.port.postMessage(Float32Array.from({ length: 1920 },
        (_, i) => 0.5 * Math.sin(2 * Math.PI * 300 * (k * 1920 + i) / 24000)));
    }
    const tone = new OscillatorNode(ctx, { frequency: 1000 });
    tone.connect(node);
    node.connect(ctx.destination);
    tone.start();
    await new Promise((r) => setTimeout(r, 100));
    const played = (await ctx.startRendering()).getChannelData(0);
    await new Promise((r) => setTimeout(r, 100));
    const mic = new Float32Array(frames.length * 1920);
    frames.forEach((f, i) => mic.set(f, i * 1920));
    out.push({ rate, frames: frames.length, micHz: crossings(mic) * 24000 / mic.length,
               micPeak: Math.max(...mic.map(Math.abs)), played: crossings(played),
               playedPeak: Math.max(...played.map(Math.abs)) });
  }
  return out;
})()"""


def test_worklet_resamples_mic_and_speaker(tiny_server, chromium):
    async def probe():
        async with aiohttp.ClientSession() as http, http.ws_connect(open_tab(chromium, tiny_server + "/")) as ws:
            r = await Tab(ws).call("Runtime.evaluate", expression=RESAMPLE_PROBE, awaitPromise=True,
                                   returnByValue=True)
            return r["result"]["value"]

    for r in asyncio.run(probe()):
        assert r["frames"] == 12, r  # 1 s of microphone -> twelve whole 80 ms frames
        assert abs(r["micHz"] - 1000) < 5 and 0.9 < r["micPeak"] < 1.01, r
        assert r["played"] == 240 and 0.49 < r["playedPeak"] < 0.51, r  # 0.8 s of 300 Hz


async def watch(urls: list[str], want_frames: int, timeout: float) -> tuple[list[dict], bytes]:
    """Poll both pages' counters until each has received `want_frames` frames and a text
    token (the tiny model prints about one token in ten frames)."""
    async with aiohttp.ClientSession() as http:
        socks = [await http.ws_connect(u, max_msg_size=1 << 26) for u in urls]
        tabs = [Tab(ws) for ws in socks]
        deadline = time.monotonic() + timeout
        while True:
            results = [json.loads(await t.evaluate("JSON.stringify(window.personaplex || {})")) for t in tabs]
            done = all(r.get("received", 0) >= want_frames and r.get("tokens") for r in results)
            if done or any(r.get("error") for r in results) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        shot = base64.b64decode((await tabs[1].call("Page.captureScreenshot", format="png"))["data"])
        for ws in socks:
            await ws.close()
    return results, shot
