"""/api/chat, PersonaPlex's own protocol, against a live `serve` (tiny model): what a client
can get wrong costs only its own session, and the query's parameters are read as the
official client sends them."""

import asyncio
import json
import time
import urllib.request

import aiohttp
import numpy as np
import pytest

from official_client import Microphone, chat_url, converse, encode, ogg_page

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 24000)) / 24000
    return (0.3 * np.sin(2 * np.pi * (150 + 50 * rng.random()) * t) * np.sin(2 * np.pi * 2 * t) ** 2
            ).astype(np.float32)


def rate_and_gap(got) -> tuple[float, float]:
    times = np.array([t for t, _ in got.audio])
    return (len(times) - 1) / (times[-1] - times[0]), np.diff(times).max()


def opus_bomb(seq: int) -> bytes:
    """Pages of the client's stream (its serial, its next sequence numbers) holding 100
    40 ms Opus frames of silence each: 4 s of audio in a few hundred bytes a page."""
    from official_client import ogg_packets

    pages = [p for p, _ in Microphone().pages(np.zeros(3840, np.float32))]  # head, tags, one audio page
    frame = ogg_packets(pages[2])[0][1]
    return b"".join(ogg_page([frame] * 100, 0, Microphone().serial, seq + i) for i in range(6))


def test_bad_clients_cost_only_their_own_session(tiny_server):
    """Beside a good session: one that sends every other kind (control, metadata, ping,
    an unknown kind, empty and text messages) keeps talking; one whose Opus turns to
    garbage, and one that sends seconds of audio in a few bytes, are told why in one
    line and closed; the good one keeps its 12.5 frames/s throughout."""
    good_url = chat_url(tiny_server, voice="NATF0.pt", prompt="You enjoy a good chat.")
    url = chat_url(tiny_server)

    def others(i):
        if i in (5, 6):
            return [encode("control", "start"), encode("metadata", {"a": 1}), encode("ping"), b"\x09junk", b"",
                    encode("text", "hi"), encode("error", "client side")]
        return []

    async def run():
        good = asyncio.create_task(converse(good_url, speechlike(8.0, 1)))
        await asyncio.sleep(0.5)
        chatty = converse(url, speechlike(3.0, 2), spoil=others)
        garbage = converse(url, speechlike(3.0, 3), spoil=lambda i: [encode("audio", bytes(range(256)) * 3)]
                           if i == 6 else [])
        polite, bad = await asyncio.gather(chatty, garbage)
        bomb = await converse(url, speechlike(3.0, 4), spoil=lambda i: [encode("audio", opus_bomb(4))] if i == 4 else [])
        return await good, polite, bad, bomb

    good, polite, bad, bomb = asyncio.run(run())
    assert good.error is None and polite.error is None, (good.error, polite.error)
    assert len(polite.audio) >= 30  # 3 s and the tail, unharmed by the kinds it ignores
    assert "AUDIO is not an Ogg Opus stream" in bad.error and "\n" not in bad.error and bad.closed_at
    assert "AUDIO runs more than 5 s ahead of real time" in bomb.error and bomb.closed_at
    rate, gap = rate_and_gap(good)
    assert len(good.audio) >= 95 and rate > 12.0 and gap < 0.3, (len(good.audio), rate, gap)
    with urllib.request.urlopen(tiny_server + "/api/info") as r:
        assert json.load(r)["sessions"] == 0


@pytest.mark.parametrize("query, error", [
    (dict(voice="NOBODY.pt"), "unknown voice 'NOBODY'"),
    (dict(voice="../voices/NATF0.pt"), "unknown voice"),
    (dict(seed="x"), "seed 'x' must be an integer from 0 to 2147483647"),
    (dict(seed="99999999999"), "must be an integer"),
    (dict(prompt="x" * 4001), "the prompt has 4001 characters; the limit is 4000"),
])
def test_refusals_are_one_error_line(tiny_server, query, error):
    seed = query.pop("seed", None)
    url = chat_url(tiny_server, **query) + (f"&seed={seed}" if seed else "")
    got = asyncio.run(converse(url, speechlike(0.5)))
    assert got.handshake_at is None and error in got.error and "\n" not in got.error, got.error


def test_a_message_too_large_is_told_in_the_protocol(tiny_server):
    async def run():
        async with aiohttp.ClientSession() as http, http.ws_connect(chat_url(tiny_server)) as ws:
            assert (await ws.receive(timeout=10)).data == b"\x00"
            await ws.send_bytes(b"\x01" + bytes(70_000))
            while True:
                msg = await ws.receive(timeout=10)
                if msg.type != aiohttp.WSMsgType.BINARY:
                    return None
                if msg.data[0] == 5:
                    return msg.data[1:].decode()

    assert asyncio.run(run()) == "message larger than 65536 bytes"


def test_audio_before_the_handshake_is_dropped_not_fatal(tiny_server):
    """A client that starts streaming at once (during a long prompt) gets its session."""
    async def run():
        mic = Microphone()
        pages = [p for p, _ in mic.pages(speechlike(2.0))]
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(chat_url(tiny_server, voice="VARF2.pt", prompt="You enjoy a good chat. " * 8)) as ws:
            for page in pages[:8]:
                await ws.send_bytes(encode("audio", page))
            assert (await ws.receive(timeout=20)).data == b"\x00"
            for page in pages[8:]:
                await ws.send_bytes(encode("audio", page))
                await asyncio.sleep(0.08)
            kinds, t0 = [], time.monotonic()
            while time.monotonic() - t0 < 1.0:
                kinds.append((await ws.receive(timeout=5)).data[0])
            return kinds

    kinds = asyncio.run(run())
    assert kinds.count(1) >= 10 and 5 not in kinds, kinds


def test_query_parameters():
    from personaplex_fast.api_chat import chat_params

    assert chat_params({"voice_prompt": "NATF2.pt", "text_prompt": "Hi.", "seed": "42"}) == ("NATF2", "Hi.", 42)
    assert chat_params({"voice_prompt": "VARM4", "text_prompt": ""}) == ("VARM4", "", None)
    assert chat_params({"seed": "-1", "text_seed": "5"}) == ("", "", None)  # the client's own seeds are not read
