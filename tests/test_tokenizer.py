"""The text tokenizer: tiny model layout and determinism, prompt encoding, transcript text."""

import numpy as np
import pytest

from personaplex_fast.config import TEXT_TOKENIZER
from personaplex_fast.errors import UserError
from personaplex_fast.tokenizer import (SYSTEM_TAG, TEXT_END_PAD, TEXT_PAD, load_tokenizer,
                                        prompt_tokens, token_text, transcript, wrap_system,
                                        write_tiny_tokenizer)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), 1000))


def test_tiny_tokenizer_is_deterministic_and_has_the_official_special_ids(tmp_path, tok):
    a = write_tiny_tokenizer(tmp_path / "a", 1000).read_bytes()
    b = write_tiny_tokenizer(tmp_path / "b", 1000).read_bytes()
    assert a == b
    assert (tmp_path / "a" / TEXT_TOKENIZER).exists()
    assert tok.vocab_size() <= 1000
    assert [tok.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (TEXT_END_PAD, TEXT_PAD) == (tok.unk_id(), tok.pad_id()) == (0, 3)
    with pytest.raises(ValueError, match="vocab_size"):
        write_tiny_tokenizer(tmp_path / "c", 100)


def test_prompt_tokens_are_the_wrapped_text_without_bos_or_eos(tok):
    assert wrap_system("  Be kind. ") == "<system> Be kind. <system>"
    assert wrap_system("<system> x <system>") == "<system> x <system>"
    ids = prompt_tokens(tok, "You are a wise teacher. Zebra #1!")
    assert ids == tok.encode("<system> You are a wise teacher. Zebra #1! <system>")
    assert tok.bos_id() not in ids and tok.eos_id() not in ids
    assert TEXT_END_PAD not in ids and TEXT_PAD not in ids  # byte fallback: no unk
    tag = tok.piece_to_id(SYSTEM_TAG)
    assert [i for i, t in enumerate(ids) if t == tag] == [1, len(ids) - 1]  # "▁", "<system>", ...
    assert prompt_tokens(tok, "") == prompt_tokens(tok, "  ") == prompt_tokens(tok, None) == []


def test_token_text_is_the_piece_with_spaces_and_drops_padding(tok):
    word = tok.encode("teacher")
    assert "".join(token_text(tok, t) for t in word) == " teacher"
    for special in (TEXT_END_PAD, 1, 2, TEXT_PAD, -2, -1, tok.vocab_size(), 31999):
        assert token_text(tok, special) == ""
    stream = [TEXT_PAD, TEXT_END_PAD] + tok.encode("hello there") + [TEXT_PAD] * 3 \
        + tok.encode("Zebra!") + [TEXT_PAD]
    assert transcript(tok, np.array(stream)) == "hello there Zebra!"


def test_missing_or_broken_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=TEXT_TOKENIZER):
        load_tokenizer(tmp_path)
    (tmp_path / TEXT_TOKENIZER).write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        load_tokenizer(tmp_path)
