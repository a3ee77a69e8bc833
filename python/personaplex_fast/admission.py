"""Admission: who gets a session of `serve`'s engine, when, and at what cost to the others.

Every endpoint that starts sessions goes through one Admission, in this order:

    plan(v, text)   the prompt is measured in characters, tokens and frames and refused
                    past the limits (a tokenizer call: no model work)
    reserve()       a slot is reserved before any work is done for the client, or the
                    client hears "try again later" (ServerFull); so at most `slots`
                    joins are ever pending, and a full server costs nothing
    join(ticket)    the prompt's prefill waits in a first-come queue; the tick loop runs
                    it in slices between ticks (work), then the engine joins the slot
    leave(ticket)   always, joined or not

A client that leaves or is refused costs nothing more: a ticket released before its
prefill starts is dropped from the queue, and one released during it stops at the next
slice. Pending joins hold no KV memory: only the prefill at the head of the queue has
a state (prompts.Prefill allocates it with its first slice).

Slices: the tick loop hands `work` the time left before the next tick; a slice is as
many prompt frames as the measured cost per frame says fit in it (at most
PREFILL_CHUNK), and when none fits, one frame, so prompts always progress and a
running session's tick is late by at most one frame of prefill (or the prompt's last
step, or the engine's copy of the prompt into its slot: each about one tick).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from .errors import UserError
from .prompts import PREFILL_CHUNK, Prefill
from .sampling import SamplingConfig
from .session_prompt import prepare_voice, prompt_prefill, special_codes, text_prompt_tokens

# Room kept free before the next tick, for the event loop to hand it the frames.
TICK_MARGIN_S = 0.005


class ServerFull(UserError):
    pass


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 4000  # checked before tokenizing
    max_prompt_tokens: int = 1000  # ~80 s of prompt; the frame limit is the model's context
    max_connections: int = 64  # open sockets, sessions included
    max_handshakes: int = 32  # sockets not in a session: TLS, HTTP, websockets before START
    handshake_timeout_s: float = 10.0  # for each of those steps, and idle keep-alive
    idle_timeout_s: float = 30.0  # a session that sends no audio


@dataclass(eq=False)
class Ticket:
    """One reserved slot, from reserve() to leave()."""

    seed: int | None = None  # the session's sampling seed (None: the engine's rule)
    prefill: Prefill | None = None
    joined: asyncio.Future | None = None  # -> the engine slot
    slot: int | None = None  # written in the worker thread only
    released: bool = False


@dataclass
class Admission:
    model: object  # loading.Model
    engine: object  # engine.Engine
    in_worker: object  # async (fn, *args) -> result, on the one thread that drives MLX
    wake: asyncio.Event  # set when there is work for the tick loop
    limits: Limits = field(default_factory=Limits)
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    voices: dict = field(default_factory=dict)  # name -> prepared voice

    def __post_init__(self):
        self.reserved = 0
        self.queue: deque[Ticket] = deque()
        self.frame_cost_s: float | None = None  # measured seconds per prefill frame
        self.special = special_codes(self.model.mimi)

    def load_voices(self, names: list[str], log) -> None:
        """Load, check and prepare every packaged voice once, at start; a voice that does
        not fit the model is left out with one line in the log."""
        for name in names:
            try:
                self.voices[name] = prepare_voice(self.model.mimi, self.model.voice(name))
            except UserError as e:
                log(f"voice {name} left out: {e}")

    # -- before any work

    def reserve(self, seed: int | None = None) -> Ticket:
        if self.reserved >= self.engine.slots:
            raise ServerFull(f"the server is full ({self.engine.slots} sessions); try again later")
        self.reserved += 1
        return Ticket(seed=seed)

    def plan(self, voice: str, prompt: str, seed: int | None = None) -> Prefill | None:
        """The session's prompt, measured and checked, not run (seed: the session's, for
        the prompt's last step; None: the server's)."""
        lim = self.limits
        if voice and voice not in self.voices:
            raise UserError(f"unknown voice {voice!r:.40}; this server has: {', '.join(self.voices) or 'none'}")
        if len(prompt) > lim.max_prompt_chars:
            raise UserError(f"the prompt has {len(prompt)} characters; the limit is {lim.max_prompt_chars}")
        tokens = text_prompt_tokens(self.model.tokenizer, prompt)
        if len(tokens) > lim.max_prompt_tokens:
            raise UserError(f"the prompt is {len(tokens)} tokens; the limit is {lim.max_prompt_tokens}")
        return prompt_prefill(self.model.lm, self.model.mimi, self.voices.get(voice), tokens,
                              self.seed if seed is None else seed, self.sampling, self.special)

    # -- the queue

    async def join(self, ticket: Ticket, prefill: Prefill | None) -> int:
        ticket.prefill = prefill
        ticket.joined = asyncio.get_running_loop().create_future()
        self.queue.append(ticket)
        self.wake.set()
        return await ticket.joined

    async def leave(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        ticket.prefill = None  # a queued or running prefill is dropped with its state
        if ticket.joined is not None:
            await self.in_worker(self._leave, ticket)
        self.reserved -= 1

    def _leave(self, ticket: Ticket) -> None:
        if ticket.slot is not None:
            self.engine.leave(ticket.slot)

    def pending(self) -> bool:
        return bool(self.queue)

    async def work(self, deadline: float | None) -> None:
        """Run prefill slices until `deadline` (loop time; None: one full slice, for
        an engine with no session to delay)."""
        loop = asyncio.get_running_loop()
        first = True
        while self.queue:
            ticket = self.queue[0]
            if ticket.released:
                self.queue.popleft()
                continue
            frames = PREFILL_CHUNK
            if deadline is not None:
                budget = deadline - TICK_MARGIN_S - loop.time()
                cost = self.frame_cost_s
                frames = min(PREFILL_CHUNK, int(budget / cost) if cost else 1)
                if frames < 1:
                    if not first:
                        return
                    frames = 1  # progress, at the price of one frame's delay
            start = loop.time()
            ran, done = await self.in_worker(self._slice, ticket, frames)
            if ran:
                cost = (loop.time() - start) / ran
                self.frame_cost_s = cost if self.frame_cost_s is None else 0.7 * self.frame_cost_s + 0.3 * cost
            if done:
                self.queue.popleft()
                if not ticket.joined.done():
                    ticket.joined.set_result(ticket.slot)
            first = False
            if deadline is None or loop.time() >= deadline - TICK_MARGIN_S:
                return

    def _slice(self, ticket: Ticket, frames: int) -> tuple[int, bool]:
        """In the worker: one slice of the ticket's prefill, or its join once the prefill
        is done. -> (prefill frames run, joined)."""
        run = ticket.prefill
        if ticket.released:
            return 0, False
        if run is not None and not run.done:
            before = run.frames_left
            run.advance(frames)
            return before - run.frames_left, False
        ticket.slot = self.engine.join(None if run is None else run.state, seed=ticket.seed)
        ticket.prefill = None
        return 0, True
