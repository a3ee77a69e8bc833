"""Our protocol at /ws: raw PCM for programs on a fast link (768 kbit/s each way; the page
and NVIDIA's client speak Ogg-Opus at /api/chat, api_chat.py).

Every message is binary: one byte of kind, then the payload. Audio is 24 kHz mono float32
little-endian, one 80 ms frame (1920 samples, 7680 bytes) per message.

    client -> server
      0x00 START  UTF-8 JSON {"voice": "" or a name from /api/info, "prompt": "" or role text};
                  the first message, once
      0x01 AUDIO  one frame of microphone audio, sent in real time after READY
                  (frames sent before READY are dropped)
    server -> client
      0x00 READY  UTF-8 JSON {"sample_rate", "frame_size", "voice", "prompt"}
      0x01 AUDIO  one frame of model audio per tick
      0x02 TEXT   UTF-8 JSON {"frame": tick index, "token": id, "text": piece}; only for
                  tokens that print (not padding)
      0x03 ERROR  UTF-8 JSON {"error": one line}; the server closes the socket after it,
                  and sends one for every message it cannot take (malformed, too large,
                  out of place), for a full server ("try again later"), and for timeouts
"""

from __future__ import annotations

import json

import numpy as np
from aiohttp import WSMsgType

from .audio import SAMPLE_RATE
from .errors import ProtocolError

START, AUDIO, TEXT, ERROR = 0, 1, 2, 3
READY = START
# The largest message (either protocol): a START with a 4000-character prompt in JSON
# escapes (12 bytes for an emoji) fits; larger ones are refused from their header by aiohttp.
MAX_MESSAGE = 64 * 1024


def message(kind: int, payload: bytes | dict) -> bytes:
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()
    return bytes([kind]) + payload


def parse_start(msg) -> tuple[str, str]:
    if msg.type != WSMsgType.BINARY or not msg.data or msg.data[0] != START:
        raise ProtocolError("the first message must be START (0x00 + JSON)")
    try:
        start = json.loads(msg.data[1:].decode())
    except (ValueError, RecursionError):
        raise ProtocolError("START payload is not a JSON object") from None
    if not isinstance(start, dict):
        raise ProtocolError("START payload is not a JSON object")
    voice, prompt = start.get("voice") or "", start.get("prompt") or ""
    if not isinstance(voice, str) or not isinstance(prompt, str):
        raise ProtocolError("START's voice and prompt must be strings")
    return voice, prompt


def parse_audio(msg, frame_size: int) -> np.ndarray:
    if msg.type != WSMsgType.BINARY:
        raise ProtocolError(f"expected a binary AUDIO message, got {msg.type.name}")
    data = msg.data
    if not data or data[0] != AUDIO:
        raise ProtocolError(f"unexpected message kind {data[0] if data else None}; only AUDIO (1) after START")
    if len(data) != 1 + 4 * frame_size:
        raise ProtocolError(f"AUDIO must be {frame_size} float32 samples ({1 + 4 * frame_size} bytes "
                            f"with the kind byte), got {len(data)} bytes")
    frame = np.frombuffer(data, dtype="<f4", offset=1)
    if not np.isfinite(frame).all():
        raise ProtocolError("AUDIO has NaN or infinite samples")
    return frame


class PcmWire:
    """Our protocol at /ws (this module's docstring): raw float32 frames, JSON control."""

    def __init__(self, frame_size: int):
        self.frame_size = frame_size

    def ready(self, voice: str, prompt: str) -> bytes:
        return message(READY, {"sample_rate": SAMPLE_RATE, "frame_size": self.frame_size,
                               "voice": voice, "prompt": prompt})

    @staticmethod
    def error(line: str) -> bytes:
        return message(ERROR, {"error": line})

    def frames(self, msg) -> list[np.ndarray]:
        """The frames of one client message (every message must be one AUDIO frame)."""
        return [parse_audio(msg, self.frame_size)]

    @staticmethod
    def output(pcm: np.ndarray, token: int, text: str, tick: int) -> list[bytes]:
        msgs = [message(AUDIO, pcm.astype("<f4").tobytes())]
        if text:
            msgs.append(message(TEXT, {"frame": tick, "token": token, "text": text}))
        return msgs
