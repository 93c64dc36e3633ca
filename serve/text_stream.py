"""Token ids in, text out, one token at a time: the text a stream may show so far, never half a
character, never the start of a stop string (serve/chat.py's turns stream through it)."""
from __future__ import annotations

from typing import Iterable, Iterator


class TextStream:
    """Token ids in, text pieces out, one token at a time. A piece is held back while it ends in an
    incomplete UTF-8 character (decoded as U+FFFD) or could be the start of a stop string; `stop`
    is the stop string that ended the text, once one has."""

    def __init__(self, tokenizer, stop_strings: Iterable[str] = ()):
        self.tokenizer, self.stop_strings = tokenizer, [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text handed out
        self.stop: str | None = None

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        for s in self.stop_strings:
            if (cut := text.find(s, self.emitted)) >= 0:
                self.stop = s
                return self._take(text, cut)
        safe = len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)
        for s in self.stop_strings:  # hold back a suffix that may grow into a stop string (litgpt)
            for k in range(min(len(s) - 1, safe - self.emitted), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._take(text, safe)

    def finish(self) -> str:
        """What was held back, at the end of the tokens (nothing after a stop string)."""
        return "" if self.stop is not None else self._take(self.tokenizer.decode(self.ids), None)

    def _take(self, text: str, end: int | None) -> str:
        piece = text[self.emitted:end]
        self.emitted += len(piece)
        return piece


def stream_text(tokenizer, tokens: Iterable[int], stop_strings: Iterable[str] = ()) -> Iterator[str]:
    """TextStream over an iterable of tokens. Returns (as the generator's value) the stop string
    that ended the text, or None."""
    text = TextStream(tokenizer, stop_strings)
    for tok in tokens:
        if piece := text.push(tok):
            yield piece
        if text.stop is not None:
            return text.stop
    if rest := text.finish():
        yield rest
    return None
