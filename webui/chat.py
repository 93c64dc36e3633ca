"""The browser chat's one function: respond(message, history, ...) yields the growing reply.

gr.ChatInterface calls it once per user message, each session with its own history; it is a plain
generator, so tests drive it without a server. The generation runs in the model's Engine, batched
with every other session's; closing this generator (stop button, closed tab) cancels it there: no
tokens are computed for nobody. A message above serve.chat.MAX_MESSAGE_CHARS is refused before
tokenizing, and never sent to the model with a later one.

The reply is yielded as a string while it grows; the last yield adds a status message under it
(backend, tokens/s, time to first token, context used), marked with metadata so it is shown as a
small titled box and never fed back to the model. Notices and errors are such messages too.
"""
from __future__ import annotations

from gradio import ChatMessage, Warning as UIWarning

from model.checkpoint import is_chat_model
from serve.chat import ChatStats, chat, continue_text, newest_within_limits, too_long
from model.sampling_fields import BY_NAME, generation_defaults
from serve.sampling import SamplingConfig
from serve.models import BACKEND_LABELS, DEFAULT, onnx_unavailable_reason

EMPTY_REPLY = "Please type a message first: an empty message has nothing to answer."


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _whole(x):
    """A float that is a whole number as an int (Gradio sends 3.0 for an integer slider)."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def note(title: str, text: str = "") -> ChatMessage:
    """A status line under the answer: shown by the Chatbot, skipped by history_to_messages."""
    return ChatMessage(content=text, metadata={"title": title, "status": "done"})


def _text(content) -> str:
    """Gradio hands message content as a string or as a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return ""


def history_to_messages(history: list, system_prompt: str = "") -> list[dict]:
    """Gradio's history -> role/content dicts for the chat template: our status lines, notices,
    empty messages and messages above the size limit (refused when they were sent; a client of the
    Gradio API may send any history) are left out, and the oldest beyond the request limits."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt and system_prompt.strip() else []
    for m in history or []:
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        metadata = (m.get("metadata") if isinstance(m, dict) else getattr(m, "metadata", None)) or {}
        text = _text(content)
        if role not in ("user", "assistant") or metadata.get("title") or not text.strip() or too_long(text):
            continue
        messages.append({"role": role, "content": text})
    return newest_within_limits(messages)


SAMPLING_ARGS = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "seed", "min_p",
                 "presence_penalty", "frequency_penalty")  # the page's inputs, in model/sampling_fields.py's order


def checked_settings(values: dict) -> dict:
    """The page's sampling inputs (None: the model's default; seed -1: random) -> the fields set,
    each checked against its range; ValueError/TypeError/OverflowError in one line otherwise."""
    seed = values.get("seed")
    values = {**values, "seed": None if seed is None or _number(seed) and seed < 0 else seed}
    # the page's numbers arrive as floats: a whole one is taken as an integer field's value;
    # check, not accept: the page's own inputs have no aliases
    return {k: BY_NAME[k].check(_whole(v) if BY_NAME[k].kind is int else v) for k, v in values.items() if v is not None}


def loaded(models, model: str, backend: str):
    """(engine, tokenizer, meta), or a note saying why the model did not load."""
    backend = backend or "onnx"
    try:
        return models.get(model or DEFAULT, backend)
    except Exception as e:  # a model that fails to load must not take the app down
        hint = " Switch the backend to PyTorch eager in Settings." if backend == "onnx" and onnx_unavailable_reason() else ""
        return note(f"error: could not load {model} on {BACKEND_LABELS.get(backend, backend)}",
                    f"{type(e).__name__}: {e}.{hint}")


def respond(message: str, history: list, system_prompt: str = "", backend: str = "onnx", model: str = DEFAULT,
            temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
            repetition_penalty: float | None = None, max_new_tokens: int | None = None, seed: int | float | None = -1,
            min_p: float | None = None, presence_penalty: float | None = None, frequency_penalty: float | None = None,
            *, models):
    """Yield the reply as it grows (a str), then [reply, status] (a list of chat messages), from
    `models` (the server's serve.models.ModelCache). The sampling settings are the fields of
    model/sampling_fields.py, in its order; one left out (None) takes the model's own default. Seed
    -1 is random. A base model (trained on plain text) continues the message instead of answering."""
    message = message if isinstance(message, str) else _text(message)
    # The new message only: history_to_messages leaves out what was refused, so one refusal does
    # not refuse every later message of the session (gr.ChatInterface keeps the refused message).
    if refusal := too_long(message) or too_long(system_prompt or ""):
        UIWarning(refusal)
        yield [note("message refused", refusal)]
        return
    if not message.strip():
        UIWarning(EMPTY_REPLY)
        yield [note(EMPTY_REPLY)]
        return
    values = dict(zip(SAMPLING_ARGS, (temperature, top_k, top_p, repetition_penalty, max_new_tokens, seed, min_p,
                                      presence_penalty, frequency_penalty)))
    try:
        given = checked_settings(values)
    except (TypeError, ValueError, OverflowError) as e:
        yield [note(f"bad setting: {e}")]
        return
    if isinstance(got := loaded(models, model, backend), ChatMessage):
        yield [got]
        return
    engine, tokenizer, meta = got
    cfg = SamplingConfig(**{**generation_defaults(meta), **given})  # every field checked above
    stats = ChatStats()
    base = not is_chat_model(meta)
    stream = continue_text(engine, tokenizer, message, cfg, stats) if base else \
        chat(engine, tokenizer, history_to_messages(history, system_prompt) + [{"role": "user", "content": message}],
             cfg, stats)
    reply = ""
    try:
        for piece in stream:
            reply += piece
            yield reply
    except Exception as e:  # a failing backend shows an error in the chat; the server keeps serving
        yield [ChatMessage(content=reply)] * bool(reply) + [note(f"error: generation failed ({type(e).__name__})", str(e))]
        return
    final = [ChatMessage(content=reply)] if reply else [note("(the model answered with an empty reply)")]
    if base:
        final.append(note(BASE_MODEL_NOTE))
    if stats.notice:
        final.append(note(f"note: {stats.notice}"))
    yield final + [note(stats.summary())]


BASE_MODEL_NOTE = ("note: this model was trained on plain text, not chats: it continued your message (earlier "
                   "turns and the system prompt are not used); the Text tab continues a whole text")


def continue_panel(text: str, backend: str = "onnx", model: str = DEFAULT, temperature: float | None = None,
                   top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                   max_new_tokens: int | None = None, seed: int | float | None = -1, min_p: float | None = None,
                   presence_penalty: float | None = None, frequency_penalty: float | None = None, *, models):
    """The Text tab: yield (text and its continuation so far, status line), for any model: what a
    base model (trained on plain text) is made for. The sampling settings are respond's (named, so
    the page's API names them)."""
    text = text if isinstance(text, str) else ""
    if refusal := too_long(text):
        yield text, f"refused: {refusal}"
        return
    if not text.strip():
        yield text, "Type the beginning of a text first: it is continued as it is, no chat template."
        return
    try:
        given = checked_settings(dict(zip(SAMPLING_ARGS, (temperature, top_k, top_p, repetition_penalty, max_new_tokens,
                                                          seed, min_p, presence_penalty, frequency_penalty))))
    except (TypeError, ValueError, OverflowError) as e:
        yield text, f"bad setting: {e}"
        return
    if isinstance(got := loaded(models, model, backend), ChatMessage):
        yield text, f"{got.metadata['title']}: {got.content}"
        return
    engine, tokenizer, meta = got
    stats, out = ChatStats(), text
    try:
        for piece in continue_text(engine, tokenizer, text, SamplingConfig(**{**generation_defaults(meta), **given}), stats):
            out += piece
            yield out, ""
    except Exception as e:  # a failing backend says so; the server keeps serving
        yield out, f"error: generation failed ({type(e).__name__}): {e}"
        return
    yield out, " · ".join(x for x in (stats.notice, stats.summary()) if x)
