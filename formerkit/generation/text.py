"""The text of generated tokens as a client sees it: pieces as they become final, cut before a stop text.

A stop text ("\\n\\n", "</answer>") may span several tokens, and a byte-level token may end inside a character, so
the text of the newest token cannot always be shown at once: ``TextPieces`` holds back what may still change and gives
out the rest. Streamed pieces then add up to exactly the text answered without streaming.
"""

from __future__ import annotations

__all__ = ["TextPieces"]


class TextPieces:
    """The text of a sequence's new tokens as it grows, cut at the first of the ``stops`` texts.

    ``add(token)`` returns the text now safe to show: a token that ends inside a character (byte-level tokens) is
    held back until the character is complete, and text that could be the start of a stop text is held back until it
    is not. Once a stop text appears, the text before it is final and ``stopped`` is True. ``tokens_shown`` counts the
    tokens whose text starts within the shown text (the tokens of a stop text are not shown); ``offsets`` holds each
    token's first character in the text. Joining every piece ``add`` and ``finish`` return gives ``text``.
    """

    def __init__(self, tokenizer, stops: list[str] = ()):
        self.tokenizer, self.stops = tokenizer, [stop for stop in stops if stop]
        self.ids: list[int] = []
        self.offsets: list[int] = []
        self.text, self.shown, self.stopped = "", 0, False
        self._decoded = ""

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.offsets.append(len(self._decoded.rstrip("\ufffd")))
        self.ids.append(token)
        self._decoded = self.tokenizer.decode(self.ids)
        candidate = self._decoded.rstrip("\ufffd")  # a character still incomplete waits for its next bytes
        found = [index for index in (candidate.find(stop) for stop in self.stops) if index >= 0]
        if found:
            self.stopped = True
            self.text = candidate[:min(found)]
            return self._show(len(self.text))
        self.text = candidate
        # The longest end of the text that a stop text starts with may still become that stop text.
        held = max((size for stop in self.stops for size in range(1, len(stop)) if candidate.endswith(stop[:size])),
                   default=0)
        return self._show(len(candidate) - held)

    def finish(self) -> str:
        """The text held back, once the sequence has ended (an incomplete character shows as a replacement mark)."""
        if not self.stopped:
            self.text = self._decoded
        return self._show(len(self.text))

    def _show(self, end: int) -> str:
        piece = self.text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return piece

    @property
    def tokens_shown(self) -> int:
        """How many tokens have text in the shown text (all of them once finished without a stop text)."""
        if not self.stopped and self.shown == len(self._decoded):
            return len(self.ids)
        return sum(1 for offset in self.offsets if offset < self.shown)
