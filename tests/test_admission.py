"""Admission on its own (tiny model, no sockets): reservations, the prompt limits, the
prefill queue in slices, and clients that leave costing nothing."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast.admission import Admission, Limits, ServerFull
from personaplex_fast.errors import UserError
from personaplex_fast.loading import load_model
from personaplex_fast.tiny import make_tiny


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(make_tiny(tmp_path_factory.mktemp("tiny")))


def run(model, body, slots=2, limits=Limits(max_prompt_tokens=100)):
    """body(admission) on an event loop with a one-thread worker, as serve has it."""
    worker = ThreadPoolExecutor(1)

    async def main():
        async def in_worker(fn, *args):
            return await asyncio.get_running_loop().run_in_executor(worker, fn, *args)

        engine = model.engine(slots=slots)
        engine.tick(np.zeros((slots, engine.frame_size), np.float32))  # evaluated here, as serve does
        adm = Admission(model, engine, in_worker, asyncio.Event(), limits)
        adm.load_voices(["NATF0"], print)
        return await body(adm)

    try:
        return asyncio.run(main())
    finally:
        worker.submit(mx.clear_streams).result()  # as serve does: see server._serve
        worker.shutdown()


def test_reservations_and_limits_come_before_any_work(model):
    async def body(adm):
        a, b = adm.reserve(), adm.reserve()
        with pytest.raises(ServerFull, match="full .*try again later"):
            adm.reserve()
        await adm.leave(a)
        c = adm.reserve()  # a's slot is free again
        await adm.leave(b)
        await adm.leave(c)
        await adm.leave(c)  # twice is harmless
        assert adm.reserved == 0
        with pytest.raises(UserError, match="the prompt has 4001 characters"):
            adm.plan("", "x" * 4001)
        with pytest.raises(UserError, match="tokens; the limit is 100"):
            adm.plan("", "\U0001F600" * 200)
        with pytest.raises(UserError, match="unknown voice 'NOPE'"):
            adm.plan("NOPE", "")
        assert adm.plan("", "") is None
        plan = adm.plan("NATF0", "Be kind.")
        assert plan.state is None and plan.frames_left > 25  # measured, not run

    run(model, body)


def test_the_queue_runs_in_slices_and_drops_clients_that_left(model):
    """Two joins queue; the second leaves before its turn: its prefill never starts
    (no KV state), the first one's runs in slices of what fits before a deadline."""
    async def body(adm):
        loop = asyncio.get_running_loop()
        first, second = adm.reserve(), adm.reserve()
        p1, p2 = adm.plan("NATF0", "You enjoy a good conversation."), adm.plan("", "Hello there.")
        j1 = asyncio.ensure_future(adm.join(first, p1))
        j2 = asyncio.ensure_future(adm.join(second, p2))
        await asyncio.sleep(0)
        await adm.work(loop.time() + 0.007)  # 2 ms past the margin: a few frames of the first prompt
        assert 0 < p1.position < len(p1.frames) and p2.state is None
        await adm.leave(second)
        while adm.pending():
            await adm.work(None)
        slot = await j1
        assert adm.engine.active[slot] and p2.state is None
        assert j2.cancelled() or not j2.done()
        j2.cancel()
        assert sum(adm.engine.active) == 1
        await adm.leave(first)
        assert not any(adm.engine.active) and adm.reserved == 0
        # The engine ticks with the joined prompt like any session.
        out = await adm.in_worker(adm.engine.tick, np.zeros((2, adm.engine.frame_size), np.float32))
        assert np.isfinite(out.pcm).all()

    run(model, body)


def test_a_session_seed_decides_its_sampling(model):
    """Sessions joined with seeds (serve's /api/chat ?seed=): the same seed and input give
    the same text and audio in any slot, another seed other ones."""
    async def body(adm):
        outs = []
        for seeds in ((7, 7), (7, 8)):
            tickets = [adm.reserve(seed) for seed in seeds]
            joins = [asyncio.ensure_future(adm.join(t, adm.plan("NATF0", "Be kind.", t.seed))) for t in tickets]
            await asyncio.sleep(0)
            while adm.pending():
                await adm.work(None)
            slots = [await j for j in joins]
            pcm = np.zeros((3, adm.engine.frame_size), np.float32)
            text, audio = [], []
            for _ in range(12):
                out = await adm.in_worker(adm.engine.tick, pcm)
                text.append(out.text[slots])
                audio.append(out.pcm[slots])
            outs.append((np.array(text), np.array(audio)))
            for t in tickets:
                await adm.leave(t)
        (same_text, same_audio), (other_text, other_audio) = outs
        assert (same_text[:, 0] == same_text[:, 1]).all() and np.array_equal(same_audio[:, 0], same_audio[:, 1])
        assert (same_text[:, 0] == other_text[:, 0]).all()  # seed 7 again, in the same slot
        assert not np.array_equal(other_audio[:, 0], other_audio[:, 1])

    run(model, body, slots=3)
