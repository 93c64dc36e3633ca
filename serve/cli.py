"""Chat with a model in the terminal, streaming the reply as it is generated.

    python -m serve.cli                                   # SmolLM2-135M-Instruct, interactive
    python -m serve.cli --model checkpoints/run/model     # your own model folder
    python -m serve.cli --greedy --prompt "What is the capital of France?"   # one shot, for scripts

In one-shot mode only the reply goes to stdout; loading messages and stats go to stderr.
Interactive commands: /reset forgets the conversation, /quit (or Ctrl-D) leaves.
"""
from __future__ import annotations

import argparse
import sys

from serve.chat import ChatStats, chat
from serve.engine import Engine
from model.sampling_fields import GENERATION_DEFAULTS as DEFAULTS
from serve.sampling import SamplingConfig
from serve.load import BACKENDS, load_backend


def run_turn(engine, tokenizer, messages, cfg, out=sys.stdout) -> str:
    stats = ChatStats()
    pieces = []
    for piece in chat(engine, tokenizer, messages, cfg, stats, conversation="cli"):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    if stats.notice:
        print(f"[note: {stats.notice}]", file=sys.stderr)
    print(f"[{stats.summary()}]", file=sys.stderr)
    return "".join(pieces)


def main(model: str = "default", backend: str = "torch", prompt: str | None = None, system: str | None = None,
         temperature: float = DEFAULTS["temperature"], top_k: int = DEFAULTS["top_k"],
         top_p: float = DEFAULTS["top_p"], repetition_penalty: float = DEFAULTS["repetition_penalty"],
         max_new_tokens: int = DEFAULTS["max_new_tokens"], seed: int | None = None, greedy: bool = False) -> int:
    try:
        cfg = SamplingConfig(temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=1.0 if greedy else repetition_penalty,
                             max_new_tokens=max_new_tokens, seed=seed)
        print(f"loading {model} on {backend} ...", file=sys.stderr)
        net, tokenizer, meta = load_backend(model, backend)
        engine = Engine(net, max_batch=1)  # one user; the engine keeps the session's cache between turns
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, OverflowError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a read-only cache folder for a first conversion
        print(f"error: cannot write {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        return converse(engine, tokenizer, meta, model, cfg, prompt, system)
    finally:
        engine.close()


def converse(engine, tokenizer, meta: dict, model: str, cfg, prompt: str | None, system: str | None) -> int:
    """One shot (`prompt`) or the interactive loop; the exit status."""
    # Bytes that are not UTF-8 (a pasted binary, another encoding) must not end the chat with a
    # UnicodeDecodeError: they arrive as U+FFFD, as a browser shows them.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    system_msgs = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        if not prompt.strip():
            print("error: the prompt is empty", file=sys.stderr)
            return 2
        run_turn(engine, tokenizer, system_msgs + [{"role": "user", "content": prompt}], cfg)
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
            reply = run_turn(engine, tokenizer, system_msgs + history, cfg)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            print("\n[stopped]", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a model folder, a HF Llama folder, a .gguf file or an ONNX export folder")
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="eager PyTorch or ONNX Runtime")
    p.add_argument("--prompt", help="answer this one message, print only the reply on stdout, and exit")
    p.add_argument("--system", help="system prompt (default: the model's template's own, if any)")
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help="0 = greedy")
    p.add_argument("--top-k", type=int, default=DEFAULTS["top_k"], help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=DEFAULTS["top_p"], help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=DEFAULTS["repetition_penalty"], help="CTRL-style penalty on seen tokens (1 = off)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"], help="longest reply in tokens")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--greedy", action="store_true", help="deterministic: always the most likely token, no penalty")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
