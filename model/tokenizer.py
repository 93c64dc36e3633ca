"""Tokenizers behind one small interface, and the chat template applied in one place.

- `BPETokenizer` wraps a HuggingFace `tokenizers.Tokenizer`: GPT-2's (from the Hub), the one stored
  in the SmolLM2 GGUF (model/gguf.py builds it), or a byte-level BPE trained on your corpus.
- `CharTokenizer` is the seed's character-level SimpleTokenizer: no dependencies at all.

Both give: encode(text), decode(ids), vocab_size, eos_id (end of document), stop_ids (ends a chat
reply), render_chat(messages) -> the exact template text, encode_chat(messages) -> ids, save(dir).

Templates render exactly as transformers' apply_chat_template renders them: with its own renderer
(render_jinja_template: a sandboxed Jinja environment with {% break %}/{% continue %}, {% generation %},
a tojson that does not HTML-escape, raise_exception, strftime_now) and the special tokens as variables.

Text a user types is always encoded as plain text: "<|im_end|>" inside a message becomes the
characters, never the control token. Only the template's own text may produce special tokens.
"""
from __future__ import annotations

import json
import re
import string
import sys
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# ChatML, as SmolLM2 uses it, without SmolLM2's default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A control token typed inside a message is wrapped in these (Unicode private use) before the
# template renders, so the rendered text tells it apart from the template's own tokens; the same
# idea as transformers' mark_control_tokens / encode_marked_chat (sanitize_control_tokens=True).
_MARK_START, _MARK_END = "\ue000", "\ue001"


def clean_text(text: str) -> str:
    """Text as the tokenizer can take it: invalid UTF-8 bytes from a terminal (surrogate escapes) and
    lone surrogates from JSON become U+FFFD, as a browser shows them, instead of a TypeError deep in
    `tokenizers`. Valid text is returned as it is (the common case costs one encode)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# A chat template is code from a model file: transformers renders it in Jinja's immutable sandbox
# (no attribute tricks, no list.append, range() capped at 100,000), but a sandbox does not bound
# work: nested loops run for hours, and a string doubled in a namespace fills memory in 30 steps.
# So the render is metered: lines of template code run, characters written, and the size of every
# value stored in a namespace or passed to a macro. A real template spends ~20 lines and well under
# 1 KB per message; 128k tokens of prompt are ~0.5 M characters.
TEMPLATE_MAX_STEPS = 500_000
TEMPLATE_MAX_CHARS = 16 * 2**20


class _TemplateMeter:
    """A trace function (sys.settrace) that follows only frames of compiled Jinja code ("<template>")
    and Namespace stores, and stops the render with one ValueError naming `origin` at a limit above."""

    def __init__(self, origin: str):
        import jinja2.utils

        self.origin, self.steps, self.chars = origin, 0, 0
        self.namespace_set = jinja2.utils.Namespace.__setitem__.__code__

    def __call__(self, frame, event, arg):  # 'call' events: which frames to follow
        if frame.f_code is self.namespace_set:  # {% set ns.x = value %}
            self._check_size(frame.f_locals["value"])
            return None
        if frame.f_code.co_filename != "<template>":
            return None
        for value in frame.f_locals.values():  # a macro's arguments
            self._check_size(value)
        return self._line

    def _line(self, frame, event, arg):
        if event == "line":
            self.steps += 1
            if self.steps > TEMPLATE_MAX_STEPS:
                self._stop(f"ran more than {TEMPLATE_MAX_STEPS:,} steps (a loop that does not end?)")
        elif event == "return" and isinstance(arg, str) and frame.f_code.co_name == "root":
            self.chars += len(arg)  # a yield of the top-level output
            if self.chars > TEMPLATE_MAX_CHARS:
                self._stop(f"wrote more than {TEMPLATE_MAX_CHARS:,} characters")
        return self._line

    def _check_size(self, value):
        if isinstance(value, (str, list, dict)) and len(value) > TEMPLATE_MAX_CHARS:
            self._stop(f"built a value of more than {TEMPLATE_MAX_CHARS:,} characters or items")

    def _stop(self, what: str):
        raise ValueError(f"the chat template ({self.origin}) {what}; refusing to render it")


def _render(template: str, messages: list[dict], add_generation_prompt: bool, special_tokens: dict,
            tools: list[dict] | None = None, origin: str = "the chat template") -> str:
    """transformers' own renderer, given the special tokens as apply_chat_template gives them
    (bos_token, eos_token, pad_token) and `tools` (OpenAI's function list, for templates that render
    it), under _TemplateMeter's limits. A template's raise_exception becomes one ValueError."""
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    previous = sys.gettrace()  # a debugger's or coverage's tracer, put back afterwards
    sys.settrace(_TemplateMeter(origin))
    try:
        rendered, _ = render_jinja_template([messages], tools=tools, chat_template=template,
                                            add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template ({origin}) is not valid Jinja: {e}") from None
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template refused these messages: {e}") from None
    finally:
        sys.settrace(previous)
    return rendered[0]


def _check_messages(messages: list[dict]) -> None:
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"a chat message must be a dict with string 'role' and 'content', got {m!r}")


class _ChatMixin:
    chat_template: str
    template_origin = "the model's chat template"  # where the template came from, for error messages

    def _special_tokens_map(self) -> dict:
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.eos_token}
        return {k: v for k, v in tokens.items() if v is not None}

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """The prompt text exactly as transformers' apply_chat_template renders the model's template."""
        _check_messages(messages)
        return _render(self.chat_template, messages, add_generation_prompt, self._special_tokens_map(), tools,
                       self.template_origin)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        """Template text may contain special tokens; in message text they are encoded as plain text."""
        _check_messages(messages)
        controls = sorted(self.control_tokens(), key=len, reverse=True)  # longest first: a token before its parts
        control_re = "|".join(map(re.escape, controls)) or "(?!)"

        def mark(text: str) -> str:  # markers typed by the user are dropped, so none can be forged
            text = text.replace(_MARK_START, "").replace(_MARK_END, "")
            return re.sub(control_re, lambda m: _MARK_START + m.group(0) + _MARK_END, text)

        marked = [{k: mark(v) if isinstance(v, str) else v for k, v in m.items()} for m in messages]
        rendered = _render(self.chat_template, marked, add_generation_prompt, self._special_tokens_map(), tools,
                           self.template_origin)
        # [template text, typed token, template text, ...]; None where a lone marker was (a template
        # that split a marked token): dropped, but the text on either side stays apart
        pieces = re.split(f"{_MARK_START}({control_re}){_MARK_END}|[{_MARK_START}{_MARK_END}]", rendered)
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if piece:
                ids += self.encode(piece) if i % 2 else self.encode_with_special(piece)
        return ids


class BPETokenizer(_ChatMixin):
    kind = "bpe"

    def __init__(self, backend, chat_template: str | None = None, eos_token: str = ENDOFTEXT,
                 bos_token: str | None = None, stop_tokens: Iterable[str] = (IM_END, ENDOFTEXT)):
        self.backend = backend  # matches special tokens in the text: template text only
        self._plain = HFTokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True  # user text: "<|im_end|>" stays characters
        self.has_template = chat_template is not None  # else ChatML, assumed
        self.chat_template = chat_template or CHATML_TEMPLATE
        self.eos_token, self.bos_token = eos_token, bos_token
        self.eos_id = self._require_id(eos_token)
        self.bos_id = None if bos_token is None else self._require_id(bos_token)
        self.stop_ids = sorted({i for t in stop_tokens if (i := backend.token_to_id(t)) is not None} | {self.eos_id})

    def _require_id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no token {token!r}")
        return i

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._plain.encode(clean_text(text), add_special_tokens=False).ids

    def encode_with_special(self, text: str) -> list[int]:
        return self.backend.encode(clean_text(text), add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def control_tokens(self) -> list[str]:
        """Every added token (special or not): what encode_with_special matches and user text must not make."""
        return [t.content for t in self.backend.get_added_tokens_decoder().values()]

    def save(self, directory: str | Path, model_max_length: int | None = None) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / "tokenizer.json"))
        # The keys transformers' PreTrainedTokenizerFast reads, so exported folders load in
        # transformers 4 and 5 alike: without model_input_names 4.x also returns token_type_ids,
        # which LlamaForCausalLM.generate rejects; without pad_token it cannot batch with padding;
        # without model_max_length it reports 1e30. Left padding is what batched generation needs.
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": self.chat_template,
                  "eos_token": self.eos_token, "bos_token": self.bos_token, "pad_token": self.eos_token,
                  "padding_side": "left",
                  "model_input_names": ["input_ids", "attention_mask"], "clean_up_tokenization_spaces": False,
                  "stop_tokens": [self.backend.id_to_token(i) for i in self.stop_ids]}
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


class CharTokenizer(_ChatMixin):
    """The seed's SimpleTokenizer: one id per character seen in the corpus, plus the specials.
    Characters it never saw map to '?' (or are dropped if the corpus had no '?')."""
    kind = "char"

    def __init__(self, chars: Iterable[str], chat_template: str | None = None):
        # Printable ASCII is always in, so a chat template and typed English never lose characters.
        self.chars = sorted(set(chars) | set(string.printable))
        self.itos = SPECIAL_TOKENS + self.chars
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.has_template = chat_template is not None  # else ChatML, assumed
        self.chat_template = chat_template or CHATML_TEMPLATE
        self.eos_token, self.bos_token = ENDOFTEXT, None
        self.eos_id, self.bos_id = self.stoi[ENDOFTEXT], None
        self.stop_ids = [self.stoi[IM_END], self.eos_id]
        self._special = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        return cls(chars)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        unk = self.stoi.get("?")
        return [i for c in text if (i := self.stoi.get(c, unk)) is not None]

    def encode_with_special(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._special.split(text):
            ids += [self.stoi[piece]] if piece in SPECIAL_TOKENS else self.encode(piece)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        n = len(SPECIAL_TOKENS) if skip_special_tokens else 0
        return "".join(self.itos[i] for i in ids if n <= i < len(self.itos))

    def token_id(self, token: str) -> int | None:
        return self.stoi.get(token)

    def control_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "char_tokenizer.json").write_text(json.dumps({"chars": self.chars, "chat_template": self.chat_template}))


Tokenizer = BPETokenizer | CharTokenizer


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({e}); the tokenizer is damaged") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object; the tokenizer is damaged")
    return data


def _field(data: dict, key: str, path: Path, check, wanted: str):
    """data[key] (None when absent) if `check` accepts it, else one ValueError naming the field."""
    value = data.get(key)
    if value is not None and not check(value):
        raise ValueError(f"{path}: {key} must be {wanted}, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load what save() wrote: tokenizer.json (+ tokenizer_config.json) or char_tokenizer.json."""
    d = Path(directory)
    if (d / "char_tokenizer.json").exists():
        path = d / "char_tokenizer.json"
        data = _json_object(path)
        chars = _field(data, "chars", path, lambda v: isinstance(v, list) and all(isinstance(c, str) and len(c) == 1 for c in v),
                       "a list of single characters")
        if chars is None:
            raise ValueError(f"{path} lacks its chars")
        tokenizer = CharTokenizer(chars, _field(data, "chat_template", path, lambda v: isinstance(v, str), "a string"))
        tokenizer.template_origin = f"{path} chat_template"
        return tokenizer
    if not (d / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer.json or char_tokenizer.json in {d}")
    return from_tokenizer_json(d / "tokenizer.json")


def from_tokenizer_json(path: str | Path) -> BPETokenizer:
    """A tokenizer.json (ours, or from any HF model folder) plus tokenizer_config.json beside it."""
    path = Path(path)
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None
    cfg_path = path.parent / "tokenizer_config.json"
    cfg = _json_object(cfg_path) if cfg_path.exists() else {}

    def token_str(key):  # HF configs store either "<tok>" or {"content": "<tok>", ...}
        t = _field(cfg, key, cfg_path, lambda v: isinstance(v, str) or isinstance(v, dict) and isinstance(v.get("content"), str),
                   'a token string or {"content": token}')
        return t["content"] if isinstance(t, dict) else t

    eos = token_str("eos_token") or ENDOFTEXT
    if backend.token_to_id(ENDOFTEXT) is not None and eos == IM_END:
        eos = ENDOFTEXT  # documents end with <|endoftext|>; <|im_end|> stays a stop token
    bos = token_str("bos_token")
    if bos is not None and backend.token_to_id(bos) is None:
        bos = None
    stops = _field(cfg, "stop_tokens", cfg_path, lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
                   "a list of token strings") or [IM_END, ENDOFTEXT, token_str("eos_token") or ENDOFTEXT]
    template = _field(cfg, "chat_template", cfg_path, lambda v: isinstance(v, str), "a string (one Jinja template)")
    try:
        tokenizer = BPETokenizer(backend, template, eos_token=eos, bos_token=bos, stop_tokens=stops)
    except ValueError as e:  # an eos_token the vocabulary lacks
        raise ValueError(f"{cfg_path}: {e}") from None
    if template is not None:
        tokenizer.template_origin = f"{cfg_path} chat_template"
    return tokenizer


def with_chat_tokens(backend):
    """Add ChatML's control tokens to a tokenizer that lacks them (GPT-2 has only <|endoftext|>)."""
    missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return backend


def gpt2_tokenizer() -> BPETokenizer:
    """GPT-2's BPE from the Hub (or the local HF cache), with ChatML tokens at ids 50257-50258."""
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained("gpt2")
    except Exception as e:
        raise RuntimeError(
            "could not load the GPT-2 tokenizer from the HuggingFace Hub or its local cache "
            f"({type(e).__name__}). Connect to the Hub once, or use --tokenizer smollm2 / bpe / char "
            "or a tokenizer.json path.") from None
    return BPETokenizer(with_chat_tokens(hf.backend_tokenizer), eos_token=ENDOFTEXT)


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """A byte-level BPE (GPT-2 style) trained on the corpus. Small vocabularies make small models
    learn much faster (llama2.c's custom tokenizer experiments)."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(backend, eos_token=ENDOFTEXT)
