"""Everything a conversation needs from one model source: LM, Mimi, text tokenizer.

A source is a Hugging Face repo name, an official checkpoint directory, a
`convert` output or a `make-tiny` directory: all hold the same file names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .checkpoint import is_hf_name, load_lm, model_files, resolve
from .config import CONFIG, ModelFiles
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
    source: str = ""
    files: ModelFiles = ModelFiles()

    def voice(self, spec: str):
        """A packaged voice name (NATF2) or a voice file (wav/flac/mp3 or .pt)."""
        from .voices import VOICES_ARCHIVE, load_voice

        if not Path(spec).expanduser().exists() and not (self.directory / VOICES_ARCHIVE).exists() \
                and is_hf_name(self.source):
            from .hub import download

            download(self.source, (VOICES_ARCHIVE,))
        return load_voice(spec, self.directory, self.lm.cfg)

    def prompt(self, voice: str | None = None, text: str | None = None, seed: int = 0,
               sampling: SamplingConfig = SamplingConfig()):
        """The PersonaPlex-prompted LM state of one session (None: no prompt)."""
        from .session_prompt import prompt_state, text_prompt_tokens

        v = self.voice(voice) if voice else None
        return prompt_state(self.lm, self.mimi, v, text_prompt_tokens(self.tokenizer, text),
                            seed=seed, sampling=sampling)

    def decode_text(self, token: int) -> str:
        """A text token as the transcript shows it ('' for padding and special ids)."""
        from .tokenizer import token_text

        return "" if self.tokenizer is None else token_text(self.tokenizer, token)

    @property
    def tokenizer(self):
        if not hasattr(self, "_tokenizer"):
            self._tokenizer = None
            path = self.directory / self.files.tokenizer
            if path.exists():
                import sentencepiece

                self._tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(path))
        return self._tokenizer

    def engine(self, slots: int = 1, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               kv_bits: int | None = None) -> Engine:
        return Engine(self.lm, self.mimi, slots=slots, sampling=sampling, seed=seed, kv_bits=kv_bits)


def load_model(source: str | Path, dtype: mx.Dtype | None = None) -> Model:
    directory = resolve(source, roles=("lm", "mimi"), optional=(CONFIG, "tokenizer"))
    files = model_files(directory)
    if not (directory / files.mimi).exists():
        raise CheckpointError(f"{directory}: no {files.mimi} (the Mimi codec) in this directory")
    lm = load_lm(directory, dtype=dtype)
    mimi = load_mimi(directory / files.mimi)
    if lm.cfg.card != mimi.cfg.quantizer.bins:
        raise CheckpointError(
            f"{directory}: LM audio card {lm.cfg.card} does not match the codec's "
            f"{mimi.cfg.quantizer.bins} codebook entries")
    return Model(lm, mimi, directory, str(source), files)
