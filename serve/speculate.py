"""Speculative decoding with no draft model: the row's own context proposes its next tokens.

    drafter = NgramDrafter(seq.prompt)
    draft = drafter.propose(seq.tokens, k)   # what followed the last occurrence of the context's
                                             # final n-gram (prompt lookup decoding), or []
    drafter.record(len(draft), accepted)     # how many the target agreed with: the next draft's
                                             # length, and a cooldown after misses

Prompt lookup decoding (Saxena 2023; transformers' prompt_lookup_num_tokens, vLLM's and
onnxruntime-genai's n-gram speculators): a chat that quotes, rewrites or summarises its prompt
repeats long runs of it, and where the context's last n tokens occurred before, what followed them
there is a good guess at what follows now. The engine (serve/engine.py) feeds the guess in one
multi-token forward and keeps each drafted token only while it equals the token the row samples
from the target at that position, so the output is the output without speculation.
"""
from __future__ import annotations

NGRAM_SIZES = (3, 2)  # the longest match first; a single token matches too often to be worth a draft
DRAFT_MAX = 4  # verifying k tokens is an M = k + 1 step, ~1.6-1.8x one step at k = 4 (issue 17)
COOLDOWN_MAX = 16  # steps without drafting after repeated misses: 1, 2, 4, ... at most this


class NgramDrafter:
    """One row's n-gram index over its context (prompt, then accepted tokens), and its record."""

    def __init__(self, prompt: list[int]):
        self.context: list[int] = []
        self.prompt_len = len(prompt)
        # n -> {n-gram: position just after its latest occurrence}. A gram enters once DRAFT_MAX
        # tokens follow it: a lookup of the context's final gram then finds an earlier occurrence
        # with a whole draft after it (in a run "a a a a" the latest "a a a" has one token after it)
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in NGRAM_SIZES}
        self._extend(prompt)
        self.length = DRAFT_MAX  # the next draft's: 1 after a miss, doubled after a whole acceptance
        self.misses = 0  # verifies in a row whose first drafted token was wrong
        self.cooldown = 0  # steps left without drafting
        self.outcomes: list[tuple[int, int]] = []  # (drafted, accepted) per verify

    def _extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.context.append(token)
            at = len(self.context) - DRAFT_MAX  # where the draft after the gram ending at at-1 starts
            for n, grams in self.index.items():
                if at >= n:
                    grams[tuple(self.context[at - n:at])] = at

    def propose(self, reply: list[int], k: int) -> list[int]:
        """At most k tokens (fewer after misses: self.length) to follow prompt + reply (the row's
        tokens so far), or [] when cooling down or when the final n-gram never occurred before."""
        self._extend(reply[len(self.context) - self.prompt_len:])
        if self.cooldown > 0:
            self.cooldown -= 1
            return []
        ctx = self.context
        for n, grams in self.index.items():
            if len(ctx) >= n and (at := grams.get(tuple(ctx[-n:]))) is not None:
                return ctx[at:at + min(k, self.length)]
        return []

    @property
    def drafted(self) -> int:
        return sum(d for d, _ in self.outcomes)

    @property
    def accepted(self) -> int:
        return sum(a for _, a in self.outcomes)

    def record(self, drafted: int, accepted: int) -> None:
        """A verify's outcome. After a miss, wait 1, 2, 4, ... steps before drafting again, and then
        draft one token: a miss then costs an M = 2 step instead of an M = 5 one (so a chat that never
        repeats its context stays near its speed without speculation); a whole acceptance doubles
        the length, up to DRAFT_MAX."""
        self.outcomes.append((drafted, accepted))
        self.length = min(2 * self.length, DRAFT_MAX) if accepted == drafted else max(accepted, 1)
        self.misses = 0 if accepted else self.misses + 1
        self.cooldown = min(2 ** (self.misses - 1), COOLDOWN_MAX) if self.misses else 0
