"""Where ``ModelService.token_events`` gets its events: the model's thread makes them, the server's event loop sends
them. Two sources share one bridge (``_Bridge``): ``BatchedSequences`` (the continuous-batching ``Engine``, the
default) and ``OneSequenceAtATime`` (each request decoded alone — models the engine cannot batch, and speculative
decoding with ``speculative_decoding(draft)``). In both a consumer that stops iterating (a client that disconnects)
cancels its sequence, and the model's thread drops it before its next step."""

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator

from formerkit.generation.engine import Engine
from formerkit.generation.requests import TokenEvent, TokenRequest
from formerkit.generation.single import decode_sequence

__all__ = ["BatchedSequences", "OneSequenceAtATime", "speculative_decoding"]


_END = object()


class _Bridge:
    """A queue the model's thread fills (``put``, from any thread) and the event loop drains (``get``): an exception
    put on it is raised by ``get``. Made inside the running loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop closed: nobody listens any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def get(self):
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class OneSequenceAtATime:
    """``token_events`` decoding each request alone (``decode_sequence``) in the model's worker thread, in the order
    they come. The worker puts each event on the request's queue as it is made; a consumer that stops listening
    sets the request's ``cancelled`` flag, and the worker drops the sequence at its next step (or before it starts)."""

    def __init__(self, model, executor: concurrent.futures.Executor, decode=decode_sequence):
        # decode(model, request, cancelled) -> TokenEvents: plain decoding, or speculative with the server's draft.
        self.model, self.executor, self.decode = model, executor, decode

    async def events(self, request: TokenRequest) -> AsyncIterator[TokenEvent]:
        bridge = _Bridge()
        cancelled = threading.Event()

        def run() -> None:
            try:
                if not cancelled.is_set():
                    for event in self.decode(self.model, request, cancelled):
                        bridge.put(event)
            except Exception as error:  # the request fails, the worker goes on
                bridge.put(error)
            finally:
                bridge.put(_END)

        bridge.loop.run_in_executor(self.executor, run)
        try:
            while (item := await bridge.get()) is not _END:
                yield item
        finally:
            cancelled.set()


def speculative_decoding(draft):
    """A ``decode`` for ``OneSequenceAtATime``: each request decoded speculatively with ``draft`` (built once by
    ``runs.load_draft``; it keeps no state between requests), stopped at the first event after ``cancelled`` is set."""
    from formerkit.generation.speculative_serving import speculative_events

    def decode(model, request: TokenRequest, cancelled: threading.Event):
        events = speculative_events(model, request, draft)
        try:
            for event in events:
                if cancelled.is_set():
                    return
                yield event
        finally:
            events.close()

    return decode


class BatchedSequences:
    """``token_events`` through an ``Engine`` (its loop started on first use): each request is submitted with a
    callback that puts its events on the request's queue; a consumer that stops listening cancels the ticket, and
    the engine frees its row before its next step. A full engine raises ``EngineFull`` at the first event, before any
    response has started."""

    def __init__(self, engine: Engine):
        self.engine = engine

    async def events(self, request: TokenRequest) -> AsyncIterator[TokenEvent]:
        bridge = _Bridge()
        ticket = self.engine.start().submit(request, bridge.put)
        try:
            while True:
                item = await bridge.get()
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            ticket.cancel()
