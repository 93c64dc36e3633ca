"""How often tool_choice "auto" calls a tool, and what a client's tools cost of the context, with the
default model (SmolLM2-135M-Instruct) through the serving code (serve/chat.py ChatTurn: the same
prompt and grammar the API uses), greedy.

    python bench/tool_calls.py                       # -> bench/results/tool_calls.json
    python bench/tool_calls.py --out /tmp/x.json --max-new-tokens 60

Auto: 12 questions that each clearly need one of three tools (weather, calculator, web search); a
question counts as called when the reply begins with the call tag, and as right when the call names
the tool the question needs. A reply is made only until it is plainly text or names its function
(at most 24 tokens): the choice is in its first tokens, and a shared 2-core CPU is slow. Context: the prompt tokens of one question
alone, with the three tools, and with the 36 tools of tests/data/openwebui_tools.json (Open WebUI's
built-ins and a few connectors, with descriptions and schemas of their real size).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # `python bench/tool_calls.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from serve.chat import ChatTurn  # noqa: E402
from serve.generate import run_alone  # noqa: E402
from serve.load import load_backend  # noqa: E402
from serve.sampling import SamplingConfig  # noqa: E402
from serve.tools import OPEN, parse_output  # noqa: E402

NAMED = re.compile(r'<tool_call>\n\{"name": "(\w+)"')  # a call, as far as its function's name
ROOT = Path(__file__).resolve().parents[1]
OPENWEBUI_TOOLS = ROOT / "tests" / "data" / "openwebui_tools.json"


def function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


TOOLS = [
    function("get_weather", "Get the current weather in a city.",
             {"city": {"type": "string", "description": "The city, e.g. Paris"},
              "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"]),
    function("calculator", "Evaluate an arithmetic expression and return the result.",
             {"expression": {"type": "string", "description": "The expression, e.g. 3 * (4 + 5)"}}, ["expression"]),
    function("web_search", "Search the web for up-to-date information.",
             {"query": {"type": "string", "description": "What to search for"}}, ["query"]),
]
QUESTIONS = [  # (question, the tool it needs)
    ("What is the weather in Paris right now?", "get_weather"),
    ("Is it raining in London today?", "get_weather"),
    ("How hot is it in Tokyo at the moment, in celsius?", "get_weather"),
    ("Tell me the current temperature in New York.", "get_weather"),
    ("What is 12345 multiplied by 6789?", "calculator"),
    ("Calculate the square root of 7921.", "calculator"),
    ("What is 17.5% of 2480?", "calculator"),
    ("Compute (123 + 456) * 789 / 3.", "calculator"),
    ("Who won yesterday's Formula 1 race?", "web_search"),
    ("What is the latest version of Python released this month?", "web_search"),
    ("Search the web for today's top news headlines.", "web_search"),
    ("What is the current stock price of Apple?", "web_search"),
]


def reply(backend, tok, messages: list[dict], body: dict, max_new_tokens: int) -> tuple[str, int]:
    """(the reply's text, its prompt tokens), made only until it is plainly text or names its function."""
    cfg = SamplingConfig(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=max_new_tokens)
    turn = ChatTurn(backend, tok, messages, cfg, output=parse_output(body))
    text, tokens = "", run_alone(backend, turn.seq)
    for token in tokens:
        text += turn.accept(token)
        if not OPEN.startswith(text[:len(OPEN)]) or NAMED.match(text):
            break
    tokens.close()
    return text + turn.finish(), turn.stats.prompt_tokens


def auto_rate(backend, tok, max_new_tokens: int) -> dict:
    """A reply counts as a call when it begins with the call tag: under auto the grammar lets the
    first tokens choose, and a begun call can only go on as a call (its arguments held to the schema)."""
    rows = []
    for question, needed in QUESTIONS:
        body = {"tools": TOOLS, "tool_choice": "auto"}
        text, prompt = reply(backend, tok, [{"role": "user", "content": question}], body, max_new_tokens)
        name = NAMED.match(text)
        rows.append({"question": question, "needs": needed, "prompt_tokens": prompt, "called": text.startswith(OPEN),
                     "name": name and name.group(1), "text": text})
        print(f"{'CALL' if rows[-1]['called'] else 'text'} {question!r}: {text[:80]!r}", file=sys.stderr, flush=True)
    called = sum(r["called"] for r in rows)
    right = sum(r["name"] == r["needs"] for r in rows)
    return {"questions": len(rows), "called": called, "right_tool": right, "rate": called / len(rows), "replies": rows}


def context_share(backend, tok) -> dict:
    """Prompt tokens of one question without tools, with the 3 bench tools, with Open WebUI's 36."""
    ask = [{"role": "user", "content": "What did the 2024 Nobel Prize in Physics reward, and who received it?"}]
    many = json.loads(OPENWEBUI_TOOLS.read_text())
    out = {"context": backend.max_seq_len}
    for label, tools in (("no_tools", None), ("3_tools", TOOLS), ("36_tools", many)):
        output = parse_output({"tools": tools, "tool_choice": "auto"} if tools else {})
        turn = ChatTurn(backend, tok, ask, SamplingConfig(max_new_tokens=1), output=output)  # the prompt, not run
        out[label] = {"prompt_tokens": turn.stats.prompt_tokens, "notice": turn.stats.notice}
    return out


def main(model: str = "default", max_new_tokens: int = 24, out: str = str(ROOT / "bench/results/tool_calls.json")) -> dict:
    backend, tok, _ = load_backend(model)
    start = time.perf_counter()
    result = {"model": model, "max_new_tokens": max_new_tokens, "greedy": True,
              "context": context_share(backend, tok),
              "auto": auto_rate(backend, tok, max_new_tokens)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    a = result["auto"]
    print(f"auto called a tool on {a['called']}/{a['questions']} questions (right tool {a['right_tool']}); "
          f"36 tools: {result['context']['36_tools']['prompt_tokens']} of {result['context']['context']} prompt tokens")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="the model to serve: 'default' (SmolLM2-135M-Instruct) or a path")
    p.add_argument("--max-new-tokens", type=int, default=24, help="each reply's budget (enough to see the call tag and the function's name)")
    p.add_argument("--out", default=str(ROOT / "bench/results/tool_calls.json"), help="where the JSON result goes")
    main(**vars(p.parse_args()))
