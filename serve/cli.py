"""Chat with a model in the terminal, streaming the reply as it is generated.

    python -m serve.cli                                   # SmolLM2-135M-Instruct, interactive
    python -m serve.cli --model checkpoints/run/model     # your own model folder
    python -m serve.cli --greedy --prompt "What is the capital of France?"   # one shot, for scripts
    python -m serve.cli --model checkpoints/stories --prompt "Once upon a time"  # a base model continues text

In one-shot mode only the reply goes to stdout; loading messages and stats go to stderr.
Interactive commands: /reset forgets the conversation, /quit (or Ctrl-D) leaves.
A base model (trained on plain text, not chats) continues each text you type instead of answering
it (as --raw does for any model); --chat wraps it in the chat template anyway.
"""
from __future__ import annotations

import argparse
import sys

from model.checkpoint import is_chat_model
from serve.chat import ChatStats, ContextFull, chat, continue_text
from serve.engine import Engine
from model.sampling_fields import BY_NAME, FIELDS, generation_defaults
from serve.sampling import SamplingConfig
from serve.load import BACKENDS, load_backend


def run_turn(engine, tokenizer, messages, cfg, out=sys.stdout, raw: bool = False) -> str:
    """The reply to `messages` streamed to `out` (raw: the continuation of the last message's text)."""
    stats = ChatStats()
    pieces = []
    stream = continue_text(engine, tokenizer, messages[-1]["content"], cfg, stats) if raw else \
        chat(engine, tokenizer, messages, cfg, stats, conversation="cli")
    for piece in stream:
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    if stats.notice:
        print(f"[note: {stats.notice}]", file=sys.stderr)
    print(f"[{stats.summary()}]", file=sys.stderr)
    return "".join(pieces)


def main(model: str = "default", backend: str = "torch", prompt: str | None = None, system: str | None = None,
         greedy: bool = False, raw: bool = False, chat: bool = False, **sampling) -> int:
    """`sampling`: the sampling fields' flags (model/sampling_fields.py); one left out (None) takes the
    model's own default."""
    try:
        given = {k: BY_NAME[k].accept(v) for k, v in sampling.items() if v is not None}  # before the slow load
        print(f"loading {model} on {backend} ...", file=sys.stderr)
        net, tokenizer, meta = load_backend(model, backend)
        settings = {**generation_defaults(meta), **given}
        if greedy:  # deterministic: the likeliest token, nothing that changes its logit
            settings.update(temperature=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
        cfg = SamplingConfig(**settings)
        engine = Engine(net, max_batch=1)  # one user; the engine keeps the session's cache between turns
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, OverflowError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a read-only cache folder for a first conversion
        print(f"error: cannot write {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        base = not is_chat_model(meta)
        raw = raw or (base and not chat)
        if raw and system:
            print("error: --system needs a chat: text is continued as it is (--raw, or a base model)", file=sys.stderr)
            return 2
        if raw and base and prompt is None:
            print(f"{meta.get('name', model)} was trained on plain text: each text you type is continued, "
                  "not answered (--chat to wrap it in the chat template anyway)", file=sys.stderr)
        return converse(engine, tokenizer, meta, model, cfg, prompt, system, raw)
    finally:
        engine.close()


def converse(engine, tokenizer, meta: dict, model: str, cfg, prompt: str | None, system: str | None,
             raw: bool = False) -> int:
    """One shot (`prompt`) or the interactive loop; the exit status. raw: each text is continued
    on its own (no conversation)."""
    # Bytes that are not UTF-8 (a pasted binary, another encoding) must not end the chat with a
    # UnicodeDecodeError: they arrive as U+FFFD, as a browser shows them.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    system_msgs = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        if not prompt.strip():
            print("error: the prompt is empty", file=sys.stderr)
            return 2
        try:
            run_turn(engine, tokenizer, system_msgs + [{"role": "user", "content": prompt}], cfg, raw=raw)
        except ValueError as e:  # the model's chat template refused or ran past its limits
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    print(f"chatting with {meta.get('name', model)} ({engine.name} on {engine.device}); /reset, /quit", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            text = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if text.strip() in ("/quit", "/exit"):
            return 0
        if text.strip() == "/reset":
            history = []
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        sys.stdout.write("bot> ")
        try:
            reply = run_turn(engine, tokenizer, system_msgs + history, cfg, raw=raw)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            print("\n[stopped]", file=sys.stderr)
            history.pop()
            continue
        except ContextFull as e:  # the system prompt is in every turn: no turn can be answered
            print(f"\nerror: {e}", file=sys.stderr)
            return 2
        except ValueError as e:  # a template that refuses this conversation: say so, keep chatting
            print(f"\nerror: {e}", file=sys.stderr)
            history.pop()
            continue
        if raw:  # a continuation is not a turn: the next text starts afresh
            history = []
            continue
        history.append({"role": "assistant", "content": reply})


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a model folder, a HF Llama folder, a .gguf file or an ONNX export folder")
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="eager PyTorch or ONNX Runtime")
    p.add_argument("--prompt", help="answer this one message, print only the reply on stdout, and exit")
    p.add_argument("--system", help="system prompt (default: the model's template's own, if any)")
    for f in FIELDS:
        if f.cli:
            own = "the model's own, else " if f.from_model else ""
            default = "" if f.default is None else f" (default: {own}{f.default})"
            p.add_argument(f.flag, type=f.kind, help=f.help + default)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--raw", action="store_true", help="continue the text as written, no chat template "
                      "(the default for a base model, trained on plain text)")
    mode.add_argument("--chat", action="store_true", help="wrap a base model's input in the chat template anyway")
    p.add_argument("--greedy", action="store_true", help="deterministic: always the most likely token, no penalty (overrides the sampling flags)")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
