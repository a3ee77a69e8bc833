"""Behaviour of our LM on its own: independent sessions, reset, sampling, memory."""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast.checkpoint import load_lm
from personaplex_fast.config import DepformerConfig, LMConfig
from personaplex_fast.models.lm import UNGENERATED
from personaplex_fast.sampling import SamplingConfig, sample
from personaplex_fast.tiny import write_lm

SMALL = LMConfig(
    dim=64, num_heads=4, num_layers=2, context=12, text_card=100, card=32,
    depformer=DepformerConfig(dim=32, num_heads=2, num_layers=1, dim_feedforward=96),
)
GREEDY = SamplingConfig(greedy=True)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_lm(write_lm(tmp_path_factory.mktemp("lm"), SMALL, seed=3))


def run(lm, user, sampling=GREEDY, seed=0):
    """Step a fresh state through user[t] ([B, user_q]); returns text logits and tokens."""
    state = lm.new_state(user.shape[1], seed=seed)
    logits, tokens = [], []
    for frame in user:
        out = lm.step(state, mx.array(frame), sampling)
        mx.eval(out.text_logits, out.text, out.audio)
        logits.append(np.array(out.text_logits))
        tokens.append(np.concatenate([np.array(out.text)[:, None], np.array(out.audio)], 1))
    return np.stack(logits), np.stack(tokens), state


def test_sessions_at_different_positions_are_independent(lm):
    """Session 1 restarts mid-stream (reset) while session 0 goes on: each must
    match a batch-of-one run of its own frames, wrap-around of the ring included."""
    rng = np.random.default_rng(0)
    T, restart = 40, 7
    a = rng.integers(0, SMALL.card, size=(T, 1, SMALL.user_q))
    b = rng.integers(0, SMALL.card, size=(T - restart, 1, SMALL.user_q))
    ref_a, tok_a, _ = run(lm, a)
    ref_b, tok_b, _ = run(lm, b)

    state = lm.new_state(2)
    junk = rng.integers(0, SMALL.card, size=(restart, 1, SMALL.user_q))
    for t in range(T):
        if t == restart:
            state.reset([1])
        second = junk[t] if t < restart else b[t - restart]
        out = lm.step(state, mx.array(np.concatenate([a[t], second])), GREEDY)
        got = np.array(out.text_logits)
        np.testing.assert_allclose(got[0], ref_a[t, 0], rtol=1e-4, atol=1e-4)
        if t >= restart:
            np.testing.assert_allclose(got[1], ref_b[t - restart, 0], rtol=1e-4, atol=1e-4)
            assert np.array_equal(np.array(out.audio)[1], tok_b[t - restart, 0, 1:])
    assert np.array(state.offsets).tolist() == [T, T - restart]


def test_outputs_are_aligned_and_warm_up_is_marked(lm):
    user = np.random.default_rng(1).integers(0, SMALL.card, size=(5, 3, SMALL.user_q))
    _, tokens, _ = run(lm, user)
    assert (tokens[:SMALL.max_delay] == UNGENERATED).all()
    body = tokens[SMALL.max_delay:]
    assert (body[..., 0] >= 0).all() and (body[..., 0] < SMALL.text_card).all()
    assert (body[..., 1:] >= 0).all() and (body[..., 1:] < SMALL.card).all()


def test_sampling_is_seeded_and_differs_from_greedy(lm):
    user = np.random.default_rng(2).integers(0, SMALL.card, size=(12, 2, SMALL.user_q))
    hot = SamplingConfig(temp_text=5.0, topk_text=50, temp_audio=5.0, topk_audio=20)
    _, t1, _ = run(lm, user, hot, seed=5)
    _, t2, _ = run(lm, user, hot, seed=5)
    _, t3, _ = run(lm, user, hot, seed=6)
    _, tg, _ = run(lm, user)
    assert np.array_equal(t1, t2)
    assert not np.array_equal(t1, t3)
    assert not np.array_equal(t1, tg)


def test_top_k_only_draws_from_the_k_largest():
    logits = mx.array(np.random.default_rng(3).standard_normal((4, 200)).astype(np.float32))
    top = np.argsort(-np.array(logits), axis=-1)[:, :5]
    for i in range(50):
        tok = np.array(sample(logits, temp=3.0, top_k=5, greedy=False, key=mx.random.key(i)))
        assert all(tok[b] in top[b] for b in range(4))


def test_memory_is_flat_past_the_context(lm):
    """Ten times the context: the KV ring keeps its size and no memory accumulates."""
    state = lm.new_state(2)
    user = mx.zeros((2, SMALL.user_q), dtype=mx.int32)
    kv_bytes = state.kv.nbytes
    marks = []
    for t in range(10 * SMALL.context):
        out = lm.step(state, user, GREEDY)
        mx.eval(out.text, out.audio, state.kv.arrays(), state.tokens)
        if t % SMALL.context == SMALL.context - 1:
            marks.append(mx.get_active_memory())
    assert state.kv.nbytes == kv_bytes
    assert max(marks[2:]) - min(marks[2:]) < 64 * 1024, marks


def test_forced_tokens_are_emitted_at_their_frame_and_only_for_their_session(lm):
    """PersonaPlex's prompts force the model's own text/audio tokens: a token forced at
    step t must come out as the aligned frame t + 1, in that session only."""
    rng = np.random.default_rng(7)
    T, at = 8, 3
    user = rng.integers(0, SMALL.card, size=(T, 2, SMALL.user_q))
    _, free, _ = run(lm, user)
    text = int(rng.integers(0, SMALL.text_card))
    audio = rng.integers(0, SMALL.card, size=SMALL.dep_q).tolist()
    state = lm.new_state(2)
    outs = []
    for t in range(T):
        kw = {}
        if t == at:
            kw = dict(force_text=mx.array([text, -1]), force_audio=mx.array([audio, [-1] * SMALL.dep_q]))
        out = lm.step(state, mx.array(user[t]), GREEDY, **kw)
        outs.append(np.concatenate([np.array(out.text)[:, None], np.array(out.audio)], 1))
    outs = np.stack(outs)
    # Step t generates frame t + 1, which comes out max_delay steps later (aligned).
    emitted = outs[at + SMALL.max_delay]
    assert emitted[0, 0] == text and np.array_equal(emitted[0, 1:], audio)
    assert np.array_equal(outs[:, 1], free[:, 1])  # the other session is untouched
    assert np.array_equal(outs[:at, 0], free[:at, 0])
    # The aligned frame `at` shares step `at` with the forced frame: its text and
    # semantic tokens were generated a step earlier and are untouched; its delayed
    # acoustic tokens are sampled after the forced semantic token (the depformer
    # runs codebooks in order), so they may change.
    assert np.array_equal(outs[at, 0, :2], free[at, 0, :2])
