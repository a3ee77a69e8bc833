"""/api/chat: PersonaPlex's own web protocol, as its web client speaks it.

The session's parameters come in the websocket URL's query: `voice_prompt`, a voice
file name as the official client sends it (`NATF2.pt`; the name alone, `NATF2`, or
empty for none), `text_prompt` (empty: none) and `seed` (an integer; -1 or absent: the
server's). The client's other parameters (temperatures, top-k, its own seeds) are read
by neither this server nor NVIDIA's. Every message is binary, one byte of kind first:

    server -> client
      0x00 HANDSHAKE  the single byte, once the voice and text prompts have run
      0x01 AUDIO      Ogg pages of one Opus stream, 24 kHz mono: one message per tick
      0x02 TEXT       one text piece in UTF-8 (SentencePiece's "▁" as a space); padding
                      tokens are not sent
      0x05 ERROR      one line in UTF-8, then the close (the official client's error kind)
    client -> server
      0x01 AUDIO      Ogg pages of one Opus stream (the client's first pages carry the
                      stream's OpusHead and OpusTags), in real time after the handshake
      other kinds     (0x03 control, 0x04 metadata, 0x06 ping, ...) and text messages are
                      ignored, as NVIDIA's server ignores them

Opus is decoded and encoded by `sphn` (Kyutai's binding of libopus and ogg, the one
moshi's server uses). A message's bytes are decoded a slice at a time, and a client
whose audio runs more than AHEAD_S ahead of the time it has been sending is refused:
one Ogg page can hold seconds of audio in a few hundred bytes, which would otherwise
cost the event loop (and every session) that much decoding per message.
"""

from __future__ import annotations

import time

import numpy as np
from aiohttp import WSMsgType

from .errors import ProtocolError

HANDSHAKE, AUDIO, TEXT, ERROR = 0, 1, 2, 5
# sphn decodes every page a slice completes in one call: 1 KB holds at most a few
# seconds of audio, a few ms of work.
SLICE_BYTES = 1024
# Audio may arrive this far ahead of real time (a network burst after a stall);
# further ahead is no microphone.
AHEAD_S = 5.0
MAX_SEED = 2**31 - 1


class OpusWire:
    """One session's Ogg-Opus streams: the client's decoded and cut into frames, the
    model's frames encoded."""

    def __init__(self, frame_size: int, sample_rate: int, clock=time.monotonic):
        import sphn

        self.frame_size, self.sample_rate, self.clock = frame_size, sample_rate, clock
        self.reader = sphn.OpusStreamReader(sample_rate)
        self.writer = sphn.OpusStreamWriter(sample_rate)
        self.pending = np.zeros(0, np.float32)  # decoded, less than a frame
        self.first_audio: float | None = None
        self.decoded = 0  # samples

    @staticmethod
    def ready(voice: str, prompt: str) -> bytes:
        return bytes([HANDSHAKE])

    @staticmethod
    def error(line: str) -> bytes:
        return bytes([ERROR]) + line.encode()

    def frames(self, msg) -> list[np.ndarray] | None:
        """The whole frames an AUDIO message completes; None for a message this
        protocol ignores. Raises ProtocolError for Opus it cannot decode."""
        if msg.type != WSMsgType.BINARY or not msg.data or msg.data[0] != AUDIO:
            return None
        now = self.clock()
        if self.first_audio is None:
            self.first_audio = now
        data, pcm = memoryview(msg.data)[1:], []
        for at in range(0, len(data), SLICE_BYTES):
            try:
                out = self.reader.append_bytes(bytes(data[at:at + SLICE_BYTES]))
            except ValueError as e:  # sphn's one error type for bad Ogg and bad Opus
                raise ProtocolError(f"AUDIO is not an Ogg Opus stream ({str(e)[:80]})") from None
            self.decoded += len(out)
            if self.decoded > (now - self.first_audio + AHEAD_S) * self.sample_rate:
                raise ProtocolError(f"AUDIO runs more than {AHEAD_S:g} s ahead of real time")
            pcm.append(np.asarray(out, np.float32))
        self.pending = np.concatenate([self.pending, *pcm])
        whole = len(self.pending) // self.frame_size * self.frame_size
        frames = list(self.pending[:whole].reshape(-1, self.frame_size))
        self.pending = self.pending[whole:]
        return frames

    def output(self, pcm: np.ndarray, token: int, text: str, tick: int) -> list[bytes]:
        pages = self.writer.append_pcm(np.ascontiguousarray(pcm, np.float32))
        msgs = [bytes([AUDIO]) + pages] if pages else []
        if text:
            msgs.append(bytes([TEXT]) + text.encode())
        return msgs


def chat_params(query) -> tuple[str, str, int | None]:
    """(voice name, text prompt, seed) from the websocket URL's query."""
    from .errors import UserError

    voice = query.get("voice_prompt", "")
    for ext in (".pt", ".wav"):
        voice = voice.removesuffix(ext)
    seed = query.get("seed", "").strip()
    if seed in ("", "-1"):
        return voice, query.get("text_prompt", ""), None
    try:
        value = int(seed)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise UserError(f"seed {seed!r:.20} must be an integer from 0 to {MAX_SEED} (or -1: the server's)")
    return voice, query.get("text_prompt", ""), value
