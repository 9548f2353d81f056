"""Continuous batching: one loop steps every running sequence one token at a time and admits newcomers between steps.

A window batcher waits a moment for requests to gather, then runs them together until the longest ends: a request
that arrives meanwhile waits for the whole batch, and a row that stopped early still takes its place. Here (as in
Orca's iteration-level scheduling, Yu et al. 2022, and vLLM's continuous batching) the unit of work is one decode
step. Each round of ``Engine.step``:

1. cancelled sequences leave (a client that went away frees its row at once);
2. waiting requests are admitted into the free rows: their prompts run through the model together (left-padded, one
   prefill pass), their first token is picked, and their keys/values are copied into the shared cache;
3. one decode step feeds every running sequence its last token (through ``LeanStep``, the eager step without the
   general forward's per-call work, where the model allows it, as ``generate`` does), and each row picks its next
   one with its own sampling settings and its own random generator; sequences that stopped or reached their length
   leave.

The cache. All rows share one ``KVCache`` and its column count ``length``, but the cache keeps, per row and slot,
whether the slot holds a real token (``keep``) and that token's position, so a row may start anywhere: a newcomer's
prefilled keys go right-aligned at the current length with the earlier slots marked not kept, exactly as left padding
is (the model masks them and counts positions over real tokens only). Running rows occupy rows ``[0, running)``, so a
step runs over a view of that prefix (no compute for free rows); a row that leaves is replaced by the last one (one
row copied). A step reads the columns from the earliest one a running row keeps (a view: the dead columns before it
cost nothing); when the buffer is full, they are dropped (compaction, the columns shifted left) or the buffer grows,
up to twice the model's context.

What a row generates is what it would generate alone (``model.generate`` of its prompt): its masked slots contribute
nothing, its positions are its own, and a seeded sample draws from a ``torch.Generator`` of its own. Floating-point
sums over a longer row of keys can differ from the lone run in the last bits, as left padding in a batch does.

``policy="window"`` is the scheduling of the window batcher ``formerkit serve`` had before (a batch run by
``model.generate``), over the same rows and steps: requests that arrive within ``wait_ms`` of the first waiting one
start together, nobody joins until the whole batch has ended, and a row that finished early keeps its place (and its
compute) until then, as ``generate`` pads a stopped row. The server keeps it so a load test compares both in one
run.

Models whose step depends on the whole batch or on the cache layout are refused with an error saying why
(encoder-decoders, dynamic and LongRoPE scaling, sliding windows with global tokens; ``formerkit serve`` then decodes
one sequence at a time); sliding-window models are
served with full-length buffers (each row's tokens are contiguous, so slot distances are token distances).
"""

from __future__ import annotations

import concurrent.futures
import copy
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from queue import SimpleQueue

import torch
from torch import Tensor

from formerkit.errors import InputError
from formerkit.generation.lean_step import LeanStep
from formerkit.generation.requests import EngineFull, TokenEvent, TokenRequest
from formerkit.nn.cache import KVCache

__all__ = ["Engine", "EngineFull", "Ticket"]


class Ticket:
    """A submitted request as the engine tracks it: ``events`` so far, ``finish_reason`` once finished, ``error`` if
    it failed. ``cancel()`` asks the engine to drop it (a queued request leaves the queue at once, a running one
    frees its row before the next step)."""

    def __init__(self, engine: Engine, request: TokenRequest, limit: int,
                 notify: Callable[[TokenEvent | BaseException], None] | None):
        self.request, self.limit, self.notify = request, limit, notify
        self.events: list[TokenEvent] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._engine = engine
        # While running: the cache row, the column of the first kept slot, the token to feed next, the generator.
        self.row: int | None = None
        self.arrived = time.monotonic()
        self.start = 0
        self.last_token = 0
        self.generator: torch.Generator | None = None

    @property
    def tokens(self) -> list[int]:
        return [event.token for event in self.events]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None or self.cancelled

    def cancel(self) -> None:
        self._engine._cancel(self)

    def _send(self, item: TokenEvent | BaseException) -> None:
        if isinstance(item, BaseException):
            self.error = item
        else:
            self.events.append(item)
            self.finish_reason = item.finish_reason
        if self.notify is not None:
            try:
                self.notify(item)
            except Exception:  # a consumer that broke must not stop the others' generation
                self.cancelled = True


class Engine:
    """Continuous batching over one decoder language model.

    max_running: sequences decoded together (the cache's rows). max_queued: requests that may wait beyond the free
    rows; ``submit`` raises ``EngineFull`` past it. context: the longest sequence (prompt + new tokens) a row may
    reach, by default the model's ``max_seq_len``; a request whose ``max_new_tokens`` would pass it finishes there
    with finish_reason "length".

    policy: "continuous" admits waiting requests between any two steps; "window" only once the running batch has
    ended, after waiting up to ``wait_ms`` from the first waiting request for others to join (a window batcher).
    initial_columns: the cache's columns at first; they grow as the rows need, up to twice the context.

    The model is put in evaluation mode. Drive it by hand (``submit``, then ``step()`` until the tickets are done), or
    ``start()`` its loop in a thread of its own (the model's worker thread) and consume each ticket through its
    ``notify`` callback; other work on the model goes through ``call`` so that thread stays the only one that runs it.
    """

    def __init__(self, model, *, max_running: int = 16, max_queued: int = 64, context: int | None = None,
                 policy: str = "continuous", wait_ms: float = 5.0, initial_columns: int = 256):
        for name, value, low in (("max_running", max_running, 1), ("max_queued", max_queued, 0),
                                 ("initial_columns", initial_columns, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name}: expected an integer >= {low}, got {value!r}")
        if policy not in ("continuous", "window"):
            raise InputError(f"policy: expected 'continuous' or 'window', got {policy!r}")
        if isinstance(wait_ms, bool) or not isinstance(wait_ms, (int, float)) or not 0 <= wait_ms <= 1000:
            raise InputError(f"wait_ms: expected a number in [0, 1000], got {wait_ms!r}")
        self.policy, self.wait = policy, wait_ms / 1000
        # The engine owns the model while it serves: evaluation mode (no dropout), as generate runs it.
        self.model = model.eval()
        self._check_model(model.config)
        context = context if context is not None else model.config.max_seq_len
        if isinstance(context, bool) or not isinstance(context, int) or context < 2:
            raise InputError(f"context: expected an integer >= 2 (the longest sequence a row may reach), got "
                             f"{context!r}; a model without max_seq_len needs it given")
        if context > model.config.num_positions and model.config.position.kind in ("learned", "sinusoidal", "rope"):
            raise InputError(f"context: {context} exceeds the model's max_seq_len {model.config.num_positions}")
        self.max_running, self.max_queued, self.context = max_running, max_queued, context
        virtual = model.input_prompt() if getattr(model, "input_prompt", None) is not None else None
        self.virtual_tokens = 0 if virtual is None else int(virtual.shape[0])  # prompt tuning: cached first
        self.device = next(model.parameters()).device
        # At most twice the longest sequence: at that size compaction frees at least a sequence's worth of columns
        # each time it runs. The buffers start smaller and grow as the rows need (a long context times many rows is
        # memory a server with short requests never needs).
        self.max_columns = 2 * (context + self.virtual_tokens)
        self.cache = self._new_cache(max_running, min(self.max_columns, initial_columns))
        self.rows: list[Ticket] = []  # rows[i] runs in cache row i
        self.queue: deque[Ticket] = deque()
        self.calls: deque[tuple[concurrent.futures.Future, Callable, tuple]] = deque()
        self.lock = threading.Condition()
        self.counters = {"steps": 0, "prefills": 0, "admitted": 0, "finished": 0, "cancelled": 0, "failed": 0,
                         "refused": 0, "compactions": 0, "grown": 0, "tokens": 0}
        self._thread: threading.Thread | None = None
        self._closed = False
        # The decode step without the general forward's per-call work (``LeanStep``; None: this model takes the
        # general forward), built at the first step and again after any ``call``, which may have changed the model.
        self._lean: LeanStep | None | bool = False

    @staticmethod
    def _check_model(config) -> None:
        if config.arch != "decoder" or config.head.kind != "lm":
            raise InputError(f"Engine: serves decoder language models (arch 'decoder', head 'lm'); this model is arch "
                             f"{config.arch!r} with head {config.head.kind!r}")
        if config.position.kind == "rope" and config.position.rope_scaling in ("dynamic", "longrope"):
            raise InputError(f"Engine: position.rope_scaling {config.position.rope_scaling!r} rotates every row by "
                             "the longest sequence of the batch, so rows stepped together would change each other; "
                             "formerkit serve decodes such a model one sequence at a time")
        if config.attention.sliding_window is not None and config.attention.global_tokens:
            raise InputError("Engine: attention.global_tokens marks the first slots of the cache as global, and rows "
                             "that start at different columns have different first slots; formerkit serve decodes such "
                             "a model one sequence at a time")

    def _new_cache(self, rows: int, length: int) -> KVCache:
        """Full-length buffers on every layer (no rolling window buffers: a row's slots move when the cache is
        compacted). Built directly rather than by ``KVCache.for_model``, whose max_length is bounded by the
        positions: here the buffer is longer than any one sequence."""
        config = self.model.config
        return KVCache(num_layers=config.num_layers, batch_size=rows, max_length=length,
                       num_kv_heads=[config.layer_kv_heads(layer) for layer in range(config.num_layers)],
                       head_dim=config.head_dim, dtype=next(self.model.parameters()).dtype, device=self.device)

    # ----- submitting -----

    def submit(self, request: TokenRequest,
               notify: Callable[[TokenEvent | BaseException], None] | None = None) -> Ticket:
        """Queues ``request``; ``notify`` (called from the engine's thread) receives each ``TokenEvent``, or the
        exception that failed the request. Raises ``EngineFull`` if the queue is full, ``InputError`` for a request
        this model cannot take."""
        if not isinstance(request, TokenRequest):
            raise InputError(f"request: expected a TokenRequest, got {type(request).__name__}")
        vocab = self.model.config.stem.vocab_size
        bad = [token for token in request.ids if isinstance(token, bool) or not isinstance(token, int)
               or not 0 <= token < vocab]
        if bad:
            raise InputError(f"ids: expected token ids in [0, {vocab}), got {bad[:5]}")
        room = self.context + 1 - len(request.ids)  # the last new token is never fed back
        if room < 1:
            raise InputError(f"ids: {len(request.ids)} prompt tokens leave no room in the context of "
                             f"{self.context} tokens")
        ticket = Ticket(self, request, min(request.max_new_tokens, room), notify)
        with self.lock:
            if self._closed:
                raise RuntimeError("Engine: closed")
            waiting_room = self.max_running - len(self.rows) + self.max_queued
            if len(self.queue) >= waiting_room:
                self.counters["refused"] += 1
                raise EngineFull(f"engine full: {len(self.rows)} sequences running (max_running "
                                 f"{self.max_running}) and {len(self.queue)} requests waiting (max_queued "
                                 f"{self.max_queued}); retry later")
            self.queue.append(ticket)
            self.lock.notify_all()
        return ticket

    def _cancel(self, ticket: Ticket) -> None:
        with self.lock:
            if ticket.done:
                return
            ticket.cancelled = True
            if ticket in self.queue:  # never started: leaves the queue now
                self.queue.remove(ticket)
                self.counters["cancelled"] += 1
            self.lock.notify_all()

    def call(self, function: Callable, *args) -> concurrent.futures.Future:
        """Runs ``function(*args)`` in the engine's thread between two steps (other work on the same model, such as
        scoring a prompt); the future holds its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.lock:
            if self._closed:
                raise RuntimeError("Engine: closed")
            self.calls.append((future, function, args))
            self.lock.notify_all()
        return future

    def stats(self) -> dict:
        """Running and waiting sequences, the limits, and counters since the start."""
        with self.lock:
            return {"policy": self.policy, "running": len(self.rows), "queued": len(self.queue),
                    "max_running": self.max_running, "max_queued": self.max_queued,
                    "cache_length": self.cache.length, **self.counters}

    # ----- the loop -----

    def step(self) -> bool:
        """One round: cancelled rows leave, waiting requests are admitted (one prefill pass), then one decode step
        for every running row. Returns False if there was nothing to do."""
        worked = self._run_calls()
        with torch.inference_mode():
            for ticket in [ticket for ticket in self.rows if ticket.cancelled]:
                self._leave(ticket)
                self.counters["cancelled"] += 1
            admitted = self._admit()
            if not self.rows:
                return admitted or worked
            try:
                self._decode()
            except Exception as error:  # the step failed for every running row: they fail, the engine goes on
                self._fail_running(error)
            self.counters["steps"] += 1
            return True

    def _run_calls(self) -> bool:
        with self.lock:
            calls, self.calls = list(self.calls), deque()
        if calls:
            self._lean = False
        for future, function, args in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function(*args))
                except Exception as error:
                    future.set_exception(error)
        return bool(calls)

    def _fail_running(self, error: BaseException) -> None:
        for ticket in list(self.rows):
            self._leave(ticket)
            self.counters["failed"] += 1
            ticket._send(error)

    def run(self) -> None:
        """The loop: steps while there is work, sleeps while there is none, until ``close()``."""
        while True:
            with self.lock:
                while not self._closed and not self.queue and not self.rows and not self.calls:
                    self.lock.wait()
                if self._closed:
                    break
            try:
                worked = self.step()
            except Exception as error:  # whatever went wrong, the running requests hear of it and the loop goes on
                self._fail_running(error)
                continue
            if not worked:  # a window still open: sleep until it closes or something arrives
                with self.lock:
                    if self.queue and not self.calls:
                        self.lock.wait(max(0.0, self.queue[0].arrived + self.wait - time.monotonic()))
        self._fail_left()

    def _fail_left(self) -> None:
        """After closing: the requests still running or waiting fail, the calls still waiting are cancelled."""
        closed = RuntimeError("Engine: closed")
        with self.lock:
            left = list(self.rows) + list(self.queue)
            self.queue.clear()
            calls, self.calls = list(self.calls), deque()
        for future, _, _ in calls:
            future.cancel()
        for ticket in left:
            if ticket.row is not None:
                self._leave(ticket)
            ticket._send(closed)

    def start(self) -> Engine:
        """Runs the loop in a thread of its own (the only thread that touches the model while it runs)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name="formerkit-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stops the loop; requests still running or waiting fail with "closed"."""
        with self.lock:
            self._closed = True
            self.lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:
            self._fail_left()

    def events(self, request: TokenRequest) -> Iterator[TokenEvent]:
        """The events of one request, for a caller in another thread than the running loop (``start()``);
        leaving the iteration early cancels the request."""
        items: SimpleQueue = SimpleQueue()
        ticket = self.submit(request, items.put)
        try:
            while True:
                item = items.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            ticket.cancel()

    # ----- admission: prefill the newcomers into free rows -----

    def _admit(self) -> bool:
        with self.lock:
            if self.policy == "window" and self.queue and (
                    self.rows or (len(self.queue) < self.max_running
                                  and time.monotonic() < self.queue[0].arrived + self.wait)):
                return False  # the batch runs to its end; or the window is open and the batch not yet full
            count = min(self.max_running - len(self.rows), len(self.queue))
            newcomers = [self.queue.popleft() for _ in range(count)]
        if not newcomers:
            return False
        try:
            logits, prefill = self._prefill(newcomers)
        except Exception as error:  # these requests fail; the running ones go on
            for ticket in newcomers:
                self.counters["failed"] += 1
                ticket._send(error)
            return True
        self.counters["prefills"] += 1
        self.counters["admitted"] += len(newcomers)
        width = prefill.length
        if width > self.cache.max_length:
            self._grow(width)
        cache = self.cache
        if width > cache.length:
            self._shift_right(width - cache.length)
        end, first = cache.length, len(self.rows)
        rows = slice(first, first + len(newcomers))
        # Right-aligned at the current length; the slots before them are not kept (as left padding).
        for layer in range(len(cache.keys)):
            cache.keys[layer][rows, :, end - width:end] = prefill.keys[layer][:, :, :width]
            cache.values[layer][rows, :, end - width:end] = prefill.values[layer][:, :, :width]
        cache.keep[rows] = False
        cache.keep[rows, end - width:end] = prefill.keep[:, :width]
        cache.positions[rows, end - width:end] = prefill.positions[:, :width]
        cache.counts[rows] = prefill.counts
        # Each newcomer's first kept column (its padding is dead from the start, for compaction).
        firsts = prefill.keep[:, :width].int().argmax(dim=1).tolist()
        for index, ticket in enumerate(newcomers):
            ticket.row, ticket.start = first + index, end - width + firsts[index]
            if ticket.request.seed is not None:
                ticket.generator = torch.Generator(device=self.device).manual_seed(ticket.request.seed)
            elif not ticket.request.sampling.greedy:  # a private generator: the global one stays untouched
                ticket.generator = torch.Generator(device=self.device).manual_seed(secrets.randbits(63))
            self.rows.append(ticket)
        self._pick(newcomers, logits)
        return True

    def _prefill(self, newcomers: list[Ticket]) -> tuple[Tensor, KVCache]:
        """The newcomers' prompts in one pass, left-padded: their last logits and a cache of their keys."""
        longest = max(len(ticket.request.ids) for ticket in newcomers)
        ids = torch.zeros(len(newcomers), longest, dtype=torch.long)
        mask = torch.zeros(len(newcomers), longest, dtype=torch.long)
        for row, ticket in enumerate(newcomers):
            prompt = ticket.request.ids
            ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, longest - len(prompt):] = 1
        cache = self._new_cache(len(newcomers), longest + self.virtual_tokens)
        padded = bool((mask == 0).any())
        logits = self.model(ids.to(self.device), attention_mask=mask.to(self.device) if padded else None,
                            cache=cache, logits_to_keep=1)[:, -1]
        return logits, cache

    # ----- decoding -----

    def _decode(self) -> None:
        running = len(self.rows)
        if self.cache.length >= self.cache.max_length:  # no column left for this step's keys
            dead = min(ticket.start for ticket in self.rows)
            # Dropping the dead columns when that frees a good share of the buffer, else more columns.
            if dead * 4 >= self.cache.max_length or self.cache.max_length >= self.max_columns:
                self._shift_left(dead)
            else:
                self._grow(self.cache.length + 1)
        cache = self.cache
        tokens = torch.tensor([ticket.last_token for ticket in self.rows], dtype=torch.long, device=self.device)
        # The step attends over the columns from the earliest a running row keeps: the ones before are dead.
        first = min(ticket.start for ticket in self.rows)
        view = self._view(running, first)
        if self._lean is False:
            self._lean = LeanStep.build(self.model, view)
        if self._lean is None:
            logits = self.model(tokens.view(running, 1), cache=view, logits_to_keep=1)[:, -1]
        else:
            self._lean.cache = view
            logits = self._lean(tokens)
        cache.counts[:running] = view.counts
        cache.length = first + view.length
        self._pick(list(self.rows), logits)

    def _view(self, count: int, first: int) -> KVCache:
        """The shared cache over rows [0, count) and columns from ``first`` on: a pass through it writes those rows'
        buffers in place (no copy; the dead columns before ``first`` are simply not read)."""
        cache = self.cache
        view = copy.copy(cache)
        view.keys = [buffer[:count, :, first:] for buffer in cache.keys]
        view.values = [buffer[:count, :, first:] for buffer in cache.values]
        view.keep, view.positions = cache.keep[:count, first:], cache.positions[:count, first:]
        view.counts = cache.counts[:count]
        view.length = cache.length - first
        view.padded = True  # rows start at different columns: every step masks the slots a row does not keep
        return view

    def _pick(self, tickets: list[Ticket], logits: Tensor) -> None:
        """Each ticket's next token from its row of ``logits`` [rows, vocab] (in ``tickets`` order), sent as an
        event; tickets that finish leave their rows."""
        chosen = logits.argmax(dim=-1).tolist()  # greedy rows; the others draw below
        wanted = [ticket.request.logprobs is not None for ticket in tickets]
        # The model's own log-probabilities, before temperature or truncation.
        log_probs = logits.float().log_softmax(dim=-1) if any(wanted) else None
        finished = []
        for index, ticket in enumerate(tickets):
            if ticket.finish_reason is not None:  # window policy: finished, waiting for its batch to end
                continue
            request = ticket.request
            if not request.sampling.greedy:
                chosen[index] = int(request.sampling.pick(logits[index:index + 1], ticket.generator)[0])
            token = chosen[index]
            logprob = top = None
            if log_probs is not None and request.logprobs is not None:
                logprob = float(log_probs[index, token])
                if request.logprobs > 0:
                    values, ids = log_probs[index].topk(min(request.logprobs, log_probs.shape[-1]))
                    top = tuple(zip(ids.tolist(), values.tolist()))
            reason = ("stop" if token in request.stop_ids
                      else "length" if len(ticket.events) + 1 >= ticket.limit else None)
            ticket.last_token = token
            self.counters["tokens"] += 1
            ticket._send(TokenEvent(token, logprob, top, reason))
            if reason is not None:
                finished.append(ticket)
        self.counters["finished"] += len(finished)
        if self.policy == "window":  # the batch ends with its last row
            if all(ticket.finish_reason is not None for ticket in self.rows):
                for ticket in self.rows:
                    ticket.row = None
                self.rows.clear()
                self.cache.length = 0
            return
        for ticket in finished:
            self._leave(ticket)

    # ----- rows and columns -----

    def _leave(self, ticket: Ticket) -> None:
        """Frees ``ticket``'s row: the last running row moves into it, so running rows stay a prefix."""
        cache, row, last = self.cache, ticket.row, len(self.rows) - 1
        if row != last:
            length = cache.length
            for buffers in (cache.keys, cache.values):
                for buffer in buffers:
                    buffer[row, :, :length] = buffer[last, :, :length]
            cache.keep[row, :length] = cache.keep[last, :length]
            cache.positions[row, :length] = cache.positions[last, :length]
            cache.counts[row] = cache.counts[last]
            moved = self.rows[last]
            self.rows[row], moved.row = moved, row
        self.rows.pop()
        ticket.row = None
        if not self.rows:
            cache.length = 0

    def _grow(self, columns: int) -> None:
        """Longer buffers (at least ``columns``, at least double, at most ``max_columns``), the running rows copied."""
        old, running = self.cache, len(self.rows)
        self.cache = self._new_cache(self.max_running, min(self.max_columns, max(columns, 2 * old.max_length)))
        length = old.length
        for new_buffers, old_buffers in ((self.cache.keys, old.keys), (self.cache.values, old.values)):
            for new, buffer in zip(new_buffers, old_buffers):
                new[:running, :, :length] = buffer[:running, :, :length]
        self.cache.keep[:running, :length] = old.keep[:running, :length]
        self.cache.positions[:running, :length] = old.positions[:running, :length]
        self.cache.counts[:running] = old.counts[:running]
        self.cache.length = length
        self.cache.padded = True
        self.counters["grown"] += 1

    def _shift_left(self, columns: int) -> None:
        """Drops the first ``columns`` columns, which no running row keeps (compaction)."""
        cache, running = self.cache, len(self.rows)
        if columns <= 0:
            raise RuntimeError(f"Engine: the cache is full ({cache.max_length} columns) and every column is still "
                               "in use")
        kept = cache.length - columns
        for buffers in (cache.keys, cache.values):
            for buffer in buffers:
                buffer[:running, :, :kept] = buffer[:running, :, columns:cache.length].clone()
        cache.keep[:running, :kept] = cache.keep[:running, columns:cache.length].clone()
        cache.positions[:running, :kept] = cache.positions[:running, columns:cache.length].clone()
        cache.length = kept
        for ticket in self.rows:
            ticket.start -= columns
        self.counters["compactions"] += 1

    def _shift_right(self, columns: int) -> None:
        """Inserts ``columns`` not-kept columns before every running row's slots (room for a longer newcomer)."""
        cache, running, length = self.cache, len(self.rows), self.cache.length
        for buffers in (cache.keys, cache.values):
            for buffer in buffers:
                buffer[:running, :, columns:columns + length] = buffer[:running, :, :length].clone()
        cache.keep[:running, columns:columns + length] = cache.keep[:running, :length].clone()
        cache.positions[:running, columns:columns + length] = cache.positions[:running, :length].clone()
        cache.keep[:running, :columns] = False
        cache.length = length + columns
        for ticket in self.rows:
            ticket.start += columns
