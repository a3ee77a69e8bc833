"""Everything a conversation needs from one model source: LM, Mimi, text tokenizer.

A source is a Hugging Face repo name, an official checkpoint directory, a
`convert` output or a `make-tiny` directory: all hold the same file names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .checkpoint import load_lm, resolve
from .config import CONFIG, LM_WEIGHTS, MIMI_WEIGHTS, TEXT_TOKENIZER
from .engine import Engine
from .errors import CheckpointError
from .mimi_checkpoint import load_mimi
from .models.lm import LM
from .models.mimi import Mimi
from .sampling import SamplingConfig


@dataclass
class Model:
    lm: LM
    mimi: Mimi
    directory: Path

    def decode_text(self, token: int) -> str:
        """A text token as the transcript shows it ('' for padding and special ids)."""
        tok = self.tokenizer
        if tok is None or token < 0 or token in (0, 3) or token >= tok.vocab_size():
            return ""
        return tok.id_to_piece(token).replace("\u2581", " ")

    @property
    def tokenizer(self):
        if not hasattr(self, "_tokenizer"):
            self._tokenizer = None
            path = self.directory / TEXT_TOKENIZER
            if path.exists():
                import sentencepiece

                self._tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(path))
        return self._tokenizer

    def engine(self, slots: int = 1, sampling: SamplingConfig = SamplingConfig(), seed: int = 0) -> Engine:
        return Engine(self.lm, self.mimi, slots=slots, sampling=sampling, seed=seed)


def load_model(source: str | Path, dtype: mx.Dtype | None = None) -> Model:
    directory = resolve(source, files=(LM_WEIGHTS, MIMI_WEIGHTS), optional=(CONFIG, TEXT_TOKENIZER))
    if not (directory / MIMI_WEIGHTS).exists():
        raise CheckpointError(f"{directory}: no {MIMI_WEIGHTS} (the Mimi codec) in this directory")
    lm = load_lm(directory, dtype=dtype)
    mimi = load_mimi(directory / MIMI_WEIGHTS)
    if lm.cfg.card != mimi.cfg.quantizer.bins:
        raise CheckpointError(
            f"{directory}: LM audio card {lm.cfg.card} does not match the codec's "
            f"{mimi.cfg.quantizer.bins} codebook entries")
    return Model(lm, mimi, directory)
