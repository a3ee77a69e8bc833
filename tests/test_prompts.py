"""PersonaPlex prompt phases: layout, and prefill == stepping frame by frame with forcing."""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast.checkpoint import load_lm
from personaplex_fast.config import DepformerConfig, LMConfig
from personaplex_fast.prompts import (SPACER_FRAMES, TEXT_PAD, PackagedVoice, build_frames,
                                      input_tokens, prefill, wrap_system)
from personaplex_fast.sampling import SamplingConfig
from personaplex_fast.tiny import write_lm

CFG = LMConfig(dim=64, num_heads=4, num_layers=2, context=40, text_card=100, card=32,
               depformer=DepformerConfig(dim=32, num_heads=2, num_layers=1, dim_feedforward=96))
GREEDY = SamplingConfig(greedy=True)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_lm(write_lm(tmp_path_factory.mktemp("lm"), CFG, seed=11))


def test_system_tags_and_phase_layout():
    assert wrap_system("  Be kind. ") == "<system> Be kind. <system>"
    assert wrap_system("<system> x <system>") == "<system> x <system>"
    voice = np.arange(5 * 8).reshape(5, 8)
    silence = tuple(range(100, 108))
    frames = build_frames(voice, 5, [7, 8, 9], silence)
    assert len(frames) == 5 + SPACER_FRAMES + 3 + SPACER_FRAMES
    assert all(f.text == TEXT_PAD for f in frames[:5 + SPACER_FRAMES])
    assert [f.text for f in frames[5 + SPACER_FRAMES:-SPACER_FRAMES]] == [7, 8, 9]
    assert frames[0].audio == tuple(range(8)) and frames[5].audio == silence
    assert all(f.audio == silence for f in frames[5:])


def step_through(lm, frames, sine, record=None):
    """The reference: one LM step per frame, forcing frame t + 1 at step t."""
    state = lm.new_state(1)
    for t in range(len(frames)):
        nxt = frames[t + 1] if t + 1 < len(frames) else None
        kw = {}
        if nxt is not None:
            kw = dict(force_text=mx.array([nxt.text]), force_audio=mx.array([list(nxt.audio)]))
        lm.step(state, mx.array([sine]), GREEDY, **kw)
    return state


def continue_logits(lm, state, steps=5, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        user = mx.array(rng.integers(0, CFG.card, (1, CFG.user_q)))
        o = lm.step(state, user, GREEDY)
        out.append(np.array(o.text_logits))
        out.append(np.array(o.audio))
    return out


def random_prompt(seed, n_voice=9, n_text=7):
    rng = np.random.default_rng(seed)
    voice = rng.integers(0, CFG.card, (n_voice, CFG.dep_q))
    silence = tuple(int(x) for x in rng.integers(0, CFG.card, CFG.dep_q))
    sine = tuple(int(x) for x in rng.integers(0, CFG.card, CFG.user_q))
    text = [int(x) for x in rng.integers(4, CFG.text_card, n_text)]
    return voice, silence, sine, text


@pytest.mark.parametrize("seed", [0, 1])
def test_prefill_equals_stepping_with_forced_tokens(lm, seed):
    """The prompt is longer than both the chunk size boundary cases and the context (40)."""
    voice, silence, sine, text = random_prompt(seed, n_voice=60 + seed, n_text=9)
    frames = build_frames(voice, len(voice), text, silence)
    stepped = step_through(lm, frames, sine)
    filled = prefill(lm, frames, sine, sampling=GREEDY)
    assert np.array(filled.offsets).tolist() == np.array(stepped.offsets).tolist() == [len(frames)]
    for a, b in zip(continue_logits(lm, filled), continue_logits(lm, stepped)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_packaged_voice_equals_its_audio_prompt(lm):
    """A voice given as recorded input embeddings + its final token ring gives the
    same state as the voice given as codes."""
    voice, silence, sine, text = random_prompt(5, n_voice=12, n_text=4)
    frames = build_frames(voice, len(voice), text, silence)
    E = len(voice) - 1  # PersonaPlex records one embedding per voice frame but the first
    embeddings = np.stack([np.array(lm.embed_frame_sequence(
        mx.array(input_tokens(lm, frames, sine, p)[None].astype(np.int32))))[0, 0] for p in range(E)])
    ring = np.stack([input_tokens(lm, frames, sine, E + j) for j in (0, 1)])
    packaged = PackagedVoice(embeddings, ring)
    frames_pt = build_frames(None, len(voice), text, silence)
    filled = prefill(lm, frames_pt, sine, voice=packaged, sampling=GREEDY)
    stepped = step_through(lm, frames, sine)
    for a, b in zip(continue_logits(lm, filled), continue_logits(lm, stepped)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
