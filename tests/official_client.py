"""A client of /api/chat written from NVIDIA's web client (client/src/protocol/encoder.ts and
types.ts, useSocket.ts, useUserAudio.ts in NVIDIA/personaplex), for the tests.

What it does as that client does: the URL's query carries text_prompt, voice_prompt as a
file name (NATF2.pt) and the client's other parameters; nothing is sent before the
handshake byte 0x00; the microphone goes out as opus-recorder streams it (20 ms Opus
frames at 24 kHz, at most 2 frames per Ogg page, each page its own 0x01 message, the
stream's OpusHead and OpusTags pages first); incoming messages are decoded by kind
(0x00 handshake, 0x01 audio, 0x02 text, 0x03 control, 0x04 metadata JSON, 0x05 error,
0x06 ping). Encoding is sphn's; the pages are re-cut here to opus-recorder's 2 frames.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import urllib.parse
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import sphn

RATE = 24000
KINDS = {0: "handshake", 1: "audio", 2: "text", 3: "control", 4: "metadata", 5: "error", 6: "ping"}
CONTROL = {"start": 0, "endTurn": 1, "pause": 2, "restart": 3}


def encode(kind: str, data: bytes | str | dict | None = None) -> bytes:
    if kind == "handshake":
        return bytes([0, 0, 0])  # version 0, model 0
    if kind == "audio":
        return b"\x01" + data
    if kind == "text":
        return b"\x02" + data.encode()
    if kind == "control":
        return bytes([3, CONTROL[data]])
    if kind == "metadata":
        return b"\x04" + json.dumps(data).encode()
    if kind == "error":
        return b"\x05" + data.encode()
    return b"\x06"  # ping


def decode(data: bytes) -> tuple[str, bytes | str]:
    kind = KINDS.get(data[0])
    if kind is None:
        raise ValueError(f"Unknown message type {data[0]}")  # the official client throws too
    body = data[1:]
    return kind, body.decode() if kind in ("text", "error") else body


# ------------------------------------------------------------------ Ogg pages

def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else r << 1
        table.append(r & 0xFFFFFFFF)
    return table


_CRC = _crc_table()


def ogg_crc(data: bytes) -> int:
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC[((crc >> 24) ^ b) & 0xFF]
    return crc


def ogg_page(packets: list[bytes], granule: int, serial: int, seq: int, flags: int = 0) -> bytes:
    lacing = []
    for p in packets:
        lacing += [255] * (len(p) // 255) + [len(p) % 255]
    head = b"OggS" + bytes([0, flags]) + struct.pack("<qII", granule, serial, seq) + b"\0\0\0\0" \
        + bytes([len(lacing)]) + bytes(lacing)
    page = bytearray(head + b"".join(packets))
    page[22:26] = struct.pack("<I", ogg_crc(bytes(page)))
    return bytes(page)


def ogg_packets(data: bytes) -> list[tuple[int, bytes]]:
    """(granule position, packet) of whole pages in `data`."""
    out, at = [], 0
    while at + 27 <= len(data):
        assert data[at:at + 4] == b"OggS", data[at:at + 4]
        granule = struct.unpack("<q", data[at + 6:at + 14])[0]
        n = data[at + 26]
        lacing = data[at + 27:at + 27 + n]
        pos, packet = at + 27 + n, b""
        for size in lacing:
            packet += data[pos:pos + size]
            pos += size
            if size < 255:
                out.append((granule, packet))
                packet = b""
        at = pos
    return out


class Microphone:
    """PCM in, opus-recorder's pages out: OpusHead and OpusTags first, then pages of at
    most 2 Opus frames (sphn's frames are 40 ms where opus-recorder's are 20 ms; the
    server reads any), granule positions at 48 kHz as the encoder set them."""

    def __init__(self, serial: int = 0x5EED):
        self.writer = sphn.OpusStreamWriter(RATE)
        self.serial, self.seq, self.frames = serial, 0, []

    def pages(self, pcm: np.ndarray) -> list[tuple[bytes, float]]:
        """[(page, the time its audio ends, s)] for `pcm` (whole 80 ms frames)."""
        out = []
        for i in range(0, len(pcm) - 1919, 1920):
            for granule, packet in ogg_packets(self.writer.append_pcm(pcm[i:i + 1920].astype(np.float32))):
                if packet.startswith((b"OpusHead", b"OpusTags")):
                    out.append((self._page([packet], 0, 2 if packet.startswith(b"OpusHead") else 0), 0.0))
                    continue
                self.frames.append(packet)
                if len(self.frames) == 2:
                    out.append((self._page(self.frames, granule), granule / 48000))
                    self.frames = []
        return out

    def _page(self, packets, granule, flags=0) -> bytes:
        page = ogg_page(packets, granule, self.serial, self.seq, flags)
        self.seq += 1
        return page


# ------------------------------------------------------------------ a session

@dataclass
class Conversation:
    opened: float = 0.0
    handshake_at: float | None = None
    audio: list = field(default_factory=list)  # (arrival time, decoded samples)
    text: list = field(default_factory=list)
    error: str | None = None
    closed_at: float | None = None
    log_at_handshake: str = ""


def chat_url(base: str, voice: str = "", prompt: str = "", seed: int | None = None, **extra) -> str:
    """The query the official client builds (Conversation.tsx buildURL), plus `seed`."""
    params = {"text_temperature": "0.7", "text_topk": "25", "audio_temperature": "0.8", "audio_topk": "250",
              "pad_mult": "0", "text_seed": "123", "audio_seed": "456", "repetition_penalty_context": "64",
              "repetition_penalty": "1", "text_prompt": prompt, "voice_prompt": voice, **extra}
    if seed is not None:
        params["seed"] = str(seed)
    return base.replace("http", "ws", 1) + "/api/chat?" + urllib.parse.urlencode(params)


async def converse(url: str, pcm: np.ndarray, on_handshake=None, spoil=None, timeout: float = 60.0,
                   tail_s: float = 1.0) -> Conversation:
    """Connect, wait for the handshake, stream `pcm` in real time as opus-recorder does
    (each page once its audio has been recorded), read until `tail_s` after the last
    page. `spoil(i)`: extra messages to send before page i."""
    got = Conversation(opened=time.monotonic())
    mic = Microphone()
    speaker = sphn.OpusStreamReader(RATE)
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=1 << 22) as ws:
        async def receive():
            while True:
                msg = await ws.receive()
                if msg.type != aiohttp.WSMsgType.BINARY:
                    got.closed_at = time.monotonic()
                    return
                kind, body = decode(msg.data)
                if kind == "handshake":
                    got.handshake_at = time.monotonic()
                    if on_handshake is not None:
                        got.log_at_handshake = on_handshake()
                    started.set()
                elif kind == "audio":
                    got.audio.append((time.monotonic(), speaker.append_bytes(body)))
                elif kind == "text":
                    got.text.append(body)
                elif kind == "error":
                    got.error = body
                    started.set()

        started = asyncio.Event()
        reader = asyncio.create_task(receive())
        try:
            await asyncio.wait_for(started.wait(), timeout)
            if got.error is None:
                t0 = time.monotonic()
                for i, (page, end_s) in enumerate(mic.pages(pcm)):
                    await asyncio.sleep(max(0.0, t0 + end_s - time.monotonic()))
                    for extra in (spoil(i) if spoil else ()):
                        await ws.send_bytes(extra)
                    await ws.send_bytes(encode("audio", page))
                    if reader.done():
                        break
                await asyncio.wait_for(asyncio.shield(reader), tail_s) if not reader.done() else None
        except asyncio.TimeoutError:
            pass
        except ConnectionError:  # closed by the server while we sent: its reason was read
            await asyncio.wait_for(asyncio.shield(reader), 5) if not reader.done() else None
        finally:
            reader.cancel()
    return got
