"""Structured output and tool calls: what a request's response_format, tools and tool_choice become.

    parse_output(body)            -> Output (or FieldError naming the field): the tools, the choice, the
                                  JSON schema, and the grammar text that constrains the reply
    tool_message(m)               an assistant message with tool_calls, or a tool result, checked
    prompt_messages(tok, msgs, output)  messages (and tools) as the model's chat template takes them
    tools_notice(tok, output, context)  a sentence when the tools take more than half the context
    ToolCallStream                the reply's text pieces -> OpenAI deltas: content, or tool calls

A call is written as Hermes' (Qwen2.5's, SmolLM3's, vLLM's `hermes` parser's) format:
    <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>
A template that renders `tools` itself gets them as its `tools` variable; for one that does not
(SmolLM2's, plain ChatML) the system message lists the functions one line each and asks for the
format in Qwen2.5's words (vLLM and llama.cpp describe tools there too for templates without tool
support, as whole JSON schemas), and a history's calls and results are written in the same tags.
For tool_choice "required" or a named function the grammar allows only calls (to that function);
for "auto" either a call or a reply that does not begin with <tool_call>; for "none" the tools are
left out of the prompt and the reply is free. The arguments follow each function's parameter schema.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from serve.grammar import json_in_lark, json_schema_grammar, lark_grammar

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
# A reply that is text: anything that does not begin with the call tag (llguidance regex: & and ~).
TEXT_RULE = 'TEXT: /(?s:.+)/ & ~/<tool_call>(?s:.*)/'
# Qwen2.5's template's words for the call format; the functions themselves are listed one line each
# (signature and the first sentence of the description), not as JSON schemas: Open WebUI's 36 built-in
# tools took 7,024 of SmolLM2's 8,192 tokens as schemas. The grammar holds the arguments to the
# schema whatever the prompt says, so the model needs only enough to choose a function.
TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query. The functions:\n{tools}\n\n"
    "To call a function, return a json object with its name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")
MAX_DESCRIPTION = 120  # characters of a function's description kept in the prompt


class FieldError(ValueError):
    """A bad request field; `param` names it, from where the request model's validator was called
    (serve/protocol.py's `invalid` makes it the API's 400)."""

    def __init__(self, param: str, message: str, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class Output:
    tools: list[dict] = field(default_factory=list)  # OpenAI's {"type": "function", "function": {...}}
    choice: str = "none"  # "none", "auto", "required", or a function's name
    parallel: bool = True  # more than one call in a reply
    json: bool = False  # response_format asks for JSON
    schema: dict | None = None  # its schema (None: any object)

    @property
    def calls(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def grammar(self) -> str | None:
        """The grammar text the reply must follow, or None (free text)."""
        if not self.calls:
            return json_schema_grammar(self.schema) if self.json else None
        functions = [t["function"] for t in self.tools if self.choice in ("auto", "required", t["function"]["name"])]
        calls = "call" if not self.parallel or self.choice not in ("auto", "required") else 'call ("\\n" call)*'
        rules = [f'calls: {calls}', 'call: "<tool_call>\\n" (' + " | ".join(f"f{i}" for i in range(len(functions))) +
                 ') "\\n</tool_call>"']
        for i, f in enumerate(functions):
            schema = {"type": "object", "properties": {"name": {"const": f["name"]},
                                                      "arguments": f.get("parameters") or {"type": "object"}},
                      "required": ["name", "arguments"], "additionalProperties": False}
            rules.append(f"f{i}: {json_in_lark(schema)}")
        if self.choice == "auto":
            reply = f"reply: {json_in_lark(self.schema or {'type': 'object'})}" if self.json else "reply: TEXT\n" + TEXT_RULE
            rules = ["start: calls | reply", reply] + rules
        else:
            rules = ["start: calls"] + rules
        return lark_grammar("\n".join(rules))


def _tools(tools) -> list[dict]:
    if not isinstance(tools, list):
        raise FieldError("tools", "tools must be a list of {type: function, function: {name, parameters}}")
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise FieldError(f"tools[{i}]", "each tool must be {type: function, function: {name, parameters}}")
        if not isinstance(f.get("parameters", {}), dict):
            raise FieldError(f"tools[{i}].function.parameters", "parameters must be a JSON schema object")
    return tools


def _choice(choice, names: list[str]) -> str:
    if choice is None:
        return "auto" if names else "none"
    if choice in ("none", "auto", "required"):
        if choice != "none" and not names:
            raise FieldError("tool_choice", f"tool_choice {choice!r} needs tools")
        return choice
    if not isinstance(choice, dict) or choice.get("type") != "function":
        raise FieldError("tool_choice", "tool_choice must be none, auto, required or {type: function, function: {name}}")
    name = choice["function"].get("name") if isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise FieldError("tool_choice.function", "tool_choice's function must be an object naming a tool: {name}")
    if name not in names:
        raise FieldError("tool_choice", f"tool_choice names {name!r}, which is not among the tools")
    return name


def _response_format(fmt) -> tuple[bool, dict | None]:
    if fmt is None:
        return False, None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema", {"type": "object"}) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise FieldError("response_format.json_schema", "json_schema must be {name, schema: {...}}")
        return True, schema
    raise FieldError("response_format", "response_format type must be text, json_object or json_schema")


def parse_output(body: dict) -> Output:
    tools = _tools(body["tools"]) if body.get("tools") is not None else []
    choice = _choice(body.get("tool_choice"), [t["function"]["name"] for t in tools])
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise FieldError("parallel_tool_calls", "parallel_tool_calls must be true or false")
    is_json, schema = _response_format(body.get("response_format"))
    return Output(tools, choice, parallel, is_json, schema)


def tool_message(m: dict) -> dict:
    """An assistant message with tool_calls (content may be null) or a tool result, as the API
    passes it on: content a string, arguments parsed."""
    if m["role"] == "tool":
        if not isinstance(m.get("content"), str):
            raise FieldError("content", "a tool message's content must be a string")
        return {"role": "tool", "content": m["content"], "tool_call_id": str(m.get("tool_call_id", ""))}
    calls = []
    for j, c in enumerate(m["tool_calls"] if isinstance(m.get("tool_calls"), list) else [None]):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise FieldError(f"tool_calls[{j}]",
                             "a tool call must be {id, type: function, function: {name, arguments: a JSON string}}")
        name, args = f["name"], f.get("arguments", {})
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except (ValueError, RecursionError) as e:  # 100,000 '[' raise RecursionError: the request's fault too
            raise FieldError(f"tool_calls[{j}].function.arguments",
                             f"a tool call's arguments must be a JSON string ({type(e).__name__})") from None
        calls.append({"id": c.get("id", ""), "type": "function", "function": {"name": name, "arguments": args}})
    content = m.get("content")
    return {"role": "assistant", "content": content if isinstance(content, str) else "", "tool_calls": calls}


def call_text(name: str, arguments) -> str:
    return OPEN + json.dumps({"name": name, "arguments": arguments}) + CLOSE


def type_text(schema) -> str:
    """A parameter's type in a TypeScript-like shorthand: string, integer, "a" | "b", string[], ..."""
    if not isinstance(schema, dict):
        return "any"
    if isinstance(schema.get("enum"), list):
        return " | ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return " | ".join(type_text(sub) for sub in schema[key])
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        return " | ".join(map(str, kind))
    if kind == "array":
        item = type_text(schema.get("items"))
        return f"({item})[]" if " " in item else f"{item}[]"
    return str(kind)


def signature(function: dict) -> str:
    """One line: name(param: type, optional?: type) - the description's first sentence, cut short."""
    schema = function.get("parameters") or {}
    required = schema.get("required") or []
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    params = ", ".join(f"{name}{'' if name in required else '?'}: {type_text(sub)}" for name, sub in props.items())
    text = " ".join(str(function.get("description") or "").split())  # one line
    first = text.split(". ")[0].rstrip(".")
    if len(first) > MAX_DESCRIPTION:
        first = first[:MAX_DESCRIPTION - 3].rsplit(" ", 1)[0] + "..."
    return f"- {function['name']}({params})" + (f": {first}" if first else "")


def describe(tools: list[dict]) -> str:
    """The tools as the system message describes them to a template without tool support."""
    return TOOLS_PROMPT.format(tools="\n".join(signature(t["function"]) for t in tools))


def tools_notice(tokenizer, output: Output, context: int) -> str:
    """A sentence when the tools' description takes more than half the model's context, else ''.
    A template that renders tools itself is measured by rendering an empty chat with and without them."""
    if not output.calls:
        return ""
    if "tools" in tokenizer.chat_template:
        empty = [{"role": "user", "content": ""}]
        tokens = len(tokenizer.encode_chat(empty, tools=output.tools)) - len(tokenizer.encode_chat(empty))
    else:
        tokens = len(tokenizer.encode(describe(output.tools)))
    if 2 * tokens <= context:
        return ""
    return (f"the {len(output.tools)} tools' descriptions take {tokens} of the model's {context}-token context, "
            "leaving little for the chat; send fewer tools")


def prompt_messages(tokenizer, messages: list[dict], output: Output) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools for the template's `tools` variable or None): native when the template
    knows tools, else the tools in the system message and calls/results in the call tags."""
    tools = output.tools if output.calls else []
    if "tools" in tokenizer.chat_template:
        return messages, tools or None
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = "\n".join(call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + calls})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        described = describe(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out, None


class ToolCallStream:
    """The reply's text pieces in, OpenAI deltas out: {"content": ...} while the reply is text, and
    one {"tool_calls": [...]} delta per call once its closing tag arrives (clients join the pieces
    of `arguments`; one piece is valid). Text that may still become the opening tag is held back.
    A call that repeats an earlier one (same name and arguments) is dropped and `ended` set, and the
    caller stops the generation there: a small model allowed several calls goes on calling
    (SmolLM2-135M chained up to 7 after a required call), and a repeat is never a new request."""

    def __init__(self, calls_allowed: bool):
        self.allowed, self.buffer, self.mode = calls_allowed, "", None if calls_allowed else "text"
        self.calls: list[dict] = []
        self.made: set[tuple[str, str]] = set()  # (name, arguments as canonical JSON) of each call
        self.ended = False

    def push(self, piece: str) -> list[dict]:
        if self.ended:
            return []
        if self.mode == "text":
            return [{"content": piece}] if piece else []
        self.buffer += piece
        if self.mode is None:
            if OPEN.startswith(self.buffer):
                return []
            self.mode = "calls" if self.buffer.startswith(OPEN) else "text"
            if self.mode == "text":
                text, self.buffer = self.buffer, ""
                return [{"content": text}]
        deltas = []
        while (end := self.buffer.find(CLOSE)) >= 0:
            call = json.loads(self.buffer[len(OPEN):end])
            self.buffer = self.buffer[end + len(CLOSE):].lstrip("\n")
            key = (call["name"], json.dumps(call["arguments"], sort_keys=True))
            if key in self.made:
                self.ended, self.buffer = True, ""
                break
            self.made.add(key)
            deltas.append(self._call(call["name"], call["arguments"]))
        return deltas

    def _call(self, name: str, arguments) -> dict:
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)}}
        self.calls.append(call)
        return {"tool_calls": [{"index": len(self.calls) - 1, **call}]}

    def finish(self) -> list[dict]:
        """What is held back: undecided text, or a call the budget cut short (as text) when no call
        came whole."""
        rest, self.buffer = self.buffer, ""
        return [{"content": rest}] if rest and not self.calls else []
