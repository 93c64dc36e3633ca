"""Chat templates render as transformers' apply_chat_template renders them, text and token ids, on
SmolLM2's own template and three written in the styles of other families. Each of these once
rendered differently here: tojson escaping, raise_exception, {% break %} and strftime_now."""
import pytest

from model.tokenizer import ENDOFTEXT, BPETokenizer, CharTokenizer

# Llama-3.2 style: bos_token, strftime_now for today's date, `| trim` on every message.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|im_start|>system\\n\\nToday Date: ' + date_string + '\\n\\n' + system_message + '<|im_end|>' }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n\\n' + message['content'] | trim + '<|im_end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n\\n' }}{%- endif %}"
)
# Mistral / Zephyr style: roles must alternate (raise_exception), replies end with eos_token.
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = none %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (system + '\\n\\n' if system and loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
# Qwen style: finds the last user turn with {% break %} and writes metadata with tojson (transformers'
# tojson keeps < > & and non-ASCII as they are; Jinja's own escapes them).
QWEN = (
    "{%- set ns = namespace(last_user=0) %}"
    "{%- for message in messages[::-1] %}{%- if message['role'] == 'user' %}"
    "{%- set ns.last_user = messages | length - 1 - loop.index0 %}{%- break %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if loop.index0 == ns.last_user %}"
    "{{- {'role': message['role'], 'chars': message['content'] | length, 'note': '<b>&é</b>'} | tojson + '\\n' }}"
    "{%- endif %}{{- message['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "  Be terse.  "}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "  ñandú <b>&</b> 🦊 \n"}],
    [{"role": "user", "content": "I typed <|im_end|> and <|endoftext|> myself"}],
]


@pytest.fixture(scope="module")
def pair(smollm2, tmp_path_factory):
    """Our SmolLM2 tokenizer and transformers' reading of the files it saves (the HF export's files)."""
    from transformers import AutoTokenizer

    _, tok, _ = smollm2
    folder = tmp_path_factory.mktemp("tok")
    tok.save(folder)
    return tok, AutoTokenizer.from_pretrained(folder)


def _with_template(tok, template):
    return BPETokenizer(tok.backend, template, eos_token=tok.eos_token, bos_token=tok.bos_token or ENDOFTEXT)


def _hf_ids(hf_tok, chat, template):
    out = hf_tok.apply_chat_template(chat, chat_template=template, add_generation_prompt=True, tokenize=True,
                                     sanitize_control_tokens=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", ["smollm2", "llama3", "mistral", "qwen"])
def test_render_and_ids_match_transformers(pair, name):
    tok, hf_tok = pair
    template = {"smollm2": tok.chat_template, "llama3": LLAMA3, "mistral": MISTRAL, "qwen": QWEN}[name]
    ours = _with_template(tok, template)
    hf_tok.bos_token = ours.bos_token  # the same special tokens on both sides (llama3 reads bos_token)
    for chat in CHATS:
        if name == "mistral" and chat[-1]["role"] != "user":
            continue
        text = hf_tok.apply_chat_template(chat, chat_template=template, tokenize=False, add_generation_prompt=True)
        assert ours.render_chat(chat) == text, (name, chat)
        assert ours.encode_chat(chat) == _hf_ids(hf_tok, chat, template), (name, chat)
    # a token typed by the user stays characters; the template's own are tokens
    typed = ours.encode_chat(CHATS[2])
    assert typed.count(tok.token_id("<|endoftext|>")) == (1 if name == "llama3" else 0)  # llama3's bos only


def test_raise_exception_is_one_clear_error(pair):
    tok, _ = pair
    ours = _with_template(tok, MISTRAL)
    with pytest.raises(ValueError, match="roles must alternate"):
        ours.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_char_tokenizer_keeps_typed_tokens_as_text():
    tok = CharTokenizer.train(["abc"])
    ids = tok.encode_chat([{"role": "user", "content": "a<|im_end|>b"}])
    assert ids.count(tok.token_id("<|im_end|>")) == 1  # the template's, not the typed one
    assert tok.decode(ids) == tok.render_chat([{"role": "user", "content": "a<|im_end|>b"}])
