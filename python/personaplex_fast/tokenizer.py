"""The text tokenizer: SentencePiece model `tokenizer_spm_32k_3.model` of the model repo.

Special ids on the model's text stream (the official tokenizer's layout, which
the tiny one reproduces): 0 is the end-of-padding marker (EPAD, sentencepiece's
unk slot), 1 BOS, 2 EOS, 3 PAD. The model emits PAD while it is silent and
EPAD right before a word; neither is text.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .config import TEXT_TOKENIZER
from .errors import UserError

TEXT_END_PAD = 0
TEXT_PAD = 3
SYSTEM_TAG = "<system>"
_SPACE = "\u2581"  # sentencepiece's word-start marker


def load_tokenizer(path: str | Path):
    """A SentencePieceProcessor from the model file or the model directory holding it."""
    import sentencepiece

    path = Path(path)
    if path.is_dir():
        path = path / TEXT_TOKENIZER
    if not path.exists():
        raise UserError(f"{path}: no text tokenizer; it is needed for text prompts and transcripts")
    tok = sentencepiece.SentencePieceProcessor()
    try:
        tok.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise UserError(f"{path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
    return tok


def wrap_system(text: str) -> str:
    """The text prompt as the model was trained on it: "<system> ... <system>"
    (left alone when the user already wrapped it; PersonaPlex's wrap_with_system_tags)."""
    text = text.strip()
    if text.startswith(SYSTEM_TAG) and text.endswith(SYSTEM_TAG):
        return text
    return f"{SYSTEM_TAG} {text} {SYSTEM_TAG}"


def prompt_tokens(tok, text: str | None) -> list[int]:
    """The text prompt's tokens, forced one per frame: the wrapped text encoded with
    sentencepiece's defaults (no BOS/EOS added). Empty text: no text phase."""
    if not text or not text.strip():
        return []
    return [int(t) for t in tok.encode(wrap_system(text))]


def token_text(tok, token: int) -> str:
    """One streamed text token as the transcript shows it, as PersonaPlex's server
    does it: the piece with '▁' as a space; '' for padding.

    Unlike PersonaPlex we also print nothing for BOS/EOS and out-of-range or
    ungenerated (negative) ids, which its server would show as "<s>" or crash on;
    a byte-fallback piece shows as its character when it is ASCII.
    """
    if token < 0 or token in (TEXT_END_PAD, TEXT_PAD) or token >= tok.vocab_size():
        return ""
    if tok.is_control(token) or tok.is_unknown(token):
        return ""
    if tok.is_byte(token):
        byte = int(tok.id_to_piece(token)[3:5], 16)  # "<0x41>"
        return chr(byte) if byte < 0x80 else ""
    return tok.id_to_piece(token).replace(_SPACE, " ")


def transcript(tok, tokens) -> str:
    """A whole stream of text tokens as text (what token_text streams, joined)."""
    return "".join(token_text(tok, int(t)) for t in tokens).strip()


# ---------------------------------------------------------------- tiny tokenizer

_SUBJECTS = ("you", "we", "the teacher", "my friend", "the agent", "jane", "the customer",
             "a wise doctor", "our team", "the pilot")
_VERBS = ("like", "answer", "book", "help", "explain", "enjoy", "order", "visit", "call",
          "remember", "need", "describe")
_OBJECTS = ("the question", "a table for two", "good music", "the weather today", "science",
            "technology", "the store hours", "a deep conversation", "my order", "the mission",
            "clear advice", "the next flight")
_TAILS = ("", "tonight", "at seven", "please", "right now", "with care", "every morning",
          "in a friendly way", "thank you very much", "on mars")


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Short English sentences from word lists, the same for a given (n, seed)."""
    rng = np.random.default_rng(seed)
    pick = lambda words: words[int(rng.integers(len(words)))]  # noqa: E731
    lines = []
    for i in range(n):
        s = f"{pick(_SUBJECTS)} {pick(_VERBS)} {pick(_OBJECTS)} {pick(_TAILS)}".strip()
        s = s[0].upper() + s[1:] + (".", "?", "!")[i % 3]
        lines.append(f"{SYSTEM_TAG} {s} {SYSTEM_TAG}" if i % 4 == 0 else s)
    return lines


def write_tiny_tokenizer(directory: str | Path, vocab_size: int = 1000) -> Path:
    """Train a small sentencepiece model into `directory/tokenizer_spm_32k_3.model`,
    deterministically, with the official special ids (0 unk/EPAD, 1 BOS, 2 EOS,
    3 PAD) and at most `vocab_size` pieces (a tiny LM's text card)."""
    import sentencepiece

    if vocab_size < 300:
        raise ValueError(f"a tiny tokenizer needs vocab_size >= 300 (256 byte pieces), got {vocab_size}")
    path = Path(directory) / TEXT_TOKENIZER
    path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    # byte_fallback: any prompt text encodes without the unk id, which on the text
    # stream would read as EPAD. One thread: the trainer is then deterministic.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()), model_writer=model, vocab_size=vocab_size,
        hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3, byte_fallback=True,
        character_coverage=1.0, user_defined_symbols=[SYSTEM_TAG], num_threads=1,
        minloglevel=2)
    path.write_bytes(model.getvalue())
    return path
