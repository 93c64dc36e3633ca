"""Chat fine-tuning data: conversations of role/content messages, loss on assistant tokens only.

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

A jsonl/json/parquet file or folder of such rows (or a Hub dataset name with a `messages` column)
is rendered with the model's own chat template. Labels are -100 everywhere but on the assistant's
replies (their text and the end-of-turn token), so the model learns to answer, not to ask.
"""
from __future__ import annotations

import torch

from train.data import load_source

IGNORE = -100


def encode_conversation(tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """(ids, labels) for one conversation, cut to max_len + 1 tokens. An assistant turn spans from
    the end of the prompt that asks for it to the end of the conversation that includes it."""
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.encode_chat(messages[:k], add_generation_prompt=True)) if k else 0
        end = len(tokenizer.encode_chat(messages[:k + 1], add_generation_prompt=False))
        if ids[:end] != tokenizer.encode_chat(messages[:k + 1], add_generation_prompt=False):
            raise ValueError("the chat template does not render conversations prefix by prefix; "
                             "assistant spans cannot be found")
        labels[start:end] = ids[start:end]
    return ids[:max_len + 1], labels[:max_len + 1]


def load_conversations(name: str) -> list[list[dict]]:
    rows = load_source(name)
    if "messages" not in rows.column_names:
        raise ValueError(f"{name}: chat data needs a 'messages' column of role/content lists; got {rows.column_names}")
    convs = [r for r in rows["messages"] if r and any(m.get("role") == "assistant" for m in r)]
    if not convs:
        raise ValueError(f"{name}: no conversation has an assistant message to learn from")
    return convs


class ChatBatches:
    """Padded batches of encoded conversations, drawn with the trainer's generator (resumable)."""

    def __init__(self, tokenizer, conversations: list[list[dict]], seq_len: int):
        self.examples = []
        for conv in conversations:
            ids, labels = encode_conversation(tokenizer, conv, seq_len)
            if len(ids) > 1 and any(l != IGNORE for l in labels[1:]):
                self.examples.append((ids, labels))
        if not self.examples:
            raise ValueError("no conversation fits with an assistant token inside --seq-len")
        self.pad = tokenizer.eos_id
        self.tokens = sum(len(i) for i, _ in self.examples)

    def batch(self, global_batch: int, generator: torch.Generator, rank: int = 0, world: int = 1):
        """(x, y): inputs and next-token labels (B, T), right-padded; padding is ignored in the loss."""
        pick = torch.randint(len(self.examples), (global_batch,), generator=generator).tolist()
        per = global_batch // world
        chosen = [self.examples[i] for i in pick[rank * per:(rank + 1) * per]]
        T = max(len(ids) for ids, _ in chosen) - 1
        x = torch.full((len(chosen), T), self.pad, dtype=torch.long)
        y = torch.full((len(chosen), T), IGNORE, dtype=torch.long)
        for row, (ids, labels) in enumerate(chosen):
            n = len(ids) - 1
            x[row, :n] = torch.tensor(ids[:-1])
            y[row, :n] = torch.tensor(labels[1:])  # position t predicts token t+1
        return x, y
