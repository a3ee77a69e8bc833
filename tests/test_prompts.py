"""PersonaPlex prompt phases: layout, and prefill == stepping frame by frame with forcing."""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast.checkpoint import load_lm
from personaplex_fast.config import DepformerConfig, LMConfig
from personaplex_fast.prompts import (SPACER_FRAMES, TEXT_PAD, PackagedVoice, Prefill, build_frames,
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


@pytest.mark.parametrize("slices", [[1], [3, 1, 7], [64]])
def test_prefill_in_slices_equals_prefill(lm, slices):
    """Prefill.advance in slices of any size (cycled) gives prefill's state,
    through a packaged voice's embeddings and the text; no KV state before the first."""
    voice, silence, sine, text = random_prompt(3, n_voice=12, n_text=5)
    frames = build_frames(voice, len(voice), text, silence)
    E = len(voice) - 1
    embeddings = np.stack([np.array(lm.embed_frame_sequence(
        mx.array(input_tokens(lm, frames, sine, p)[None].astype(np.int32))))[0, 0] for p in range(E)])
    packaged = PackagedVoice(embeddings, np.stack([input_tokens(lm, frames, sine, E + j) for j in (0, 1)]))
    frames_pt = build_frames(None, len(voice), text, silence)
    whole = prefill(lm, frames_pt, sine, voice=packaged, sampling=GREEDY)
    run = Prefill(lm, frames_pt, sine, voice=packaged, sampling=GREEDY)
    assert run.state is None and run.frames_left == len(frames_pt)
    calls = 0
    while not run.advance(slices[calls % len(slices)]):
        calls += 1
        assert run.frames_left > 0
    assert run.frames_left == 0
    if slices == [1]:  # one frame a call, the last step included
        assert calls + 1 == len(frames_pt)
    for a, b in zip(continue_logits(lm, run.state), continue_logits(lm, whole)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # chunk lengths change the sum order


# ------------------------------------------- against a model of PersonaPlex's cache
#
# `personaplex_inputs` restates how NVIDIA's LMGen.prepare_step_input fills its token
# cache (ring of max_delay + 3): call o writes frame o's streams at o + delay,
# resets position o of every stream whose delay is >= o to the initial token, does
# nothing else on call 0, and on call o > 0 feeds position o - 1 to the model.


def personaplex_inputs(cfg, frames, sine):
    ring = cfg.max_delay + 3
    cache = np.full((1 + cfg.n_q, ring), -2)
    initial = [cfg.text_initial_token] + [cfg.audio_initial_token] * cfg.n_q
    inputs = []
    for o, frame in enumerate(frames):
        streams = [frame.text, *frame.audio, *sine]
        for k, delay in enumerate(cfg.delays):
            cache[k, (o + delay) % ring] = streams[k]
        for k, delay in enumerate(cfg.delays):
            if o <= delay:
                cache[k, o % ring] = initial[k]
        if o == 0:
            cache[:, 0] = initial
            continue
        inputs.append(cache[:, (o - 1) % ring].copy())
    return np.stack(inputs), cache


def tiny_text_tokens(tmp_path, text):
    from personaplex_fast.tokenizer import load_tokenizer, prompt_tokens, write_tiny_tokenizer

    return prompt_tokens(load_tokenizer(write_tiny_tokenizer(tmp_path, 1000)), text)


def test_prompt_inputs_match_personaplex_cache(tmp_path):
    """Every temporal input of the four phases, with a real (tiny) text prompt."""
    from types import SimpleNamespace

    from personaplex_fast.tiny import TINY

    text = tiny_text_tokens(tmp_path, "You are a wise teacher. Answer the question.")
    rng = np.random.default_rng(3)
    voice = rng.integers(0, TINY.card, (11, TINY.dep_q))
    silence = tuple(range(10, 10 + TINY.dep_q))
    sine = tuple(range(40, 40 + TINY.user_q))
    frames = build_frames(voice, len(voice), text, silence)
    # Phase lengths: voice frames, 6 spacers, one frame per token, 6 spacers.
    assert len(frames) == 11 + SPACER_FRAMES + len(text) + SPACER_FRAMES
    assert [f.text for f in frames] == [TEXT_PAD] * (11 + SPACER_FRAMES) + text + [TEXT_PAD] * SPACER_FRAMES
    expected, _ = personaplex_inputs(TINY, frames, sine)
    lm_like = SimpleNamespace(cfg=TINY)
    ours = np.stack([input_tokens(lm_like, frames, sine, p) for p in range(len(frames) - 1)])
    np.testing.assert_array_equal(ours, expected)
    # The first frame is never seen; position 0 is all initial tokens.
    assert ours[0].tolist() == [TINY.text_initial_token] + [TINY.audio_initial_token] * TINY.n_q


def test_packaged_voice_ring_is_personaplex_cache_after_the_voice(tmp_path):
    """A .pt voice's "cache" is LMGen's cache after the voice phase (E + 1 calls for
    E embeddings); read_pt_voice must pick the two positions the next phases read."""
    from types import SimpleNamespace

    from personaplex_fast import torchfile
    from personaplex_fast.tiny import TINY
    from personaplex_fast.voices import read_pt_voice

    rng = np.random.default_rng(4)
    voice = rng.integers(0, TINY.card, (9, TINY.dep_q))
    silence = tuple(range(10, 10 + TINY.dep_q))
    sine = tuple(range(40, 40 + TINY.user_q))
    frames = build_frames(voice, len(voice), [5, 6], silence)
    _, cache = personaplex_inputs(TINY, frames[:len(voice)], sine)
    E = len(voice) - 1
    torchfile.save(tmp_path / "v.pt", {"embeddings": np.zeros((E, 1, 1, 4), np.float32),
                                       "cache": cache[None]})
    packaged = read_pt_voice(tmp_path / "v.pt")
    lm_like = SimpleNamespace(cfg=TINY)
    np.testing.assert_array_equal(packaged.ring_tokens[0], input_tokens(lm_like, frames, sine, E))
    delayed = [k for k, d in enumerate(TINY.delays) if d == 1]
    np.testing.assert_array_equal(packaged.ring_tokens[1][delayed],
                                  input_tokens(lm_like, frames, sine, E + 1)[delayed])
    # Given as a packaged voice, the prompt reads the same tokens from position E on.
    frames_pt = build_frames(None, len(voice), [5, 6], silence)
    for p in range(E, len(frames) - 1):
        np.testing.assert_array_equal(input_tokens(lm_like, frames_pt, sine, p, packaged),
                                      input_tokens(lm_like, frames, sine, p))
