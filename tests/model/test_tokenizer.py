"""Tokenizers: round trips, the chat template, save/load."""
import pytest

from model.tokenizer import (CHATML_TEMPLATE, IM_END, IM_START, CharTokenizer, from_tokenizer_json, load_tokenizer,
                             train_bpe)

TEXTS = ["Hello world, this is 42 tokens of text. ", "Emoji 🦊 and Ünïcode, عربي right-to-left.\n"]


@pytest.mark.parametrize("make", [lambda: train_bpe(TEXTS * 30, 350), lambda: CharTokenizer.train(TEXTS)])
def test_round_trip_and_save_load(make, tmp_path):
    tok = make()
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    assert again.stop_ids == tok.stop_ids and again.eos_id == tok.eos_id
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u " + IM_START}]
    assert again.encode_chat(msgs) == tok.encode_chat(msgs)


def test_chatml_render():
    tok = CharTokenizer.train(TEXTS)
    text = tok.render_chat([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=False).endswith(f"{IM_END}\n")


def test_bad_messages_and_files(tmp_path):
    tok = CharTokenizer.train(TEXTS)
    with pytest.raises(ValueError, match="role"):
        tok.encode_chat([{"role": "user"}])
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        from_tokenizer_json(tmp_path / "tokenizer.json")


def test_template_is_used_as_given():
    tok = train_bpe(TEXTS * 30, 350)
    assert tok.chat_template == CHATML_TEMPLATE


def test_saved_folders_get_ordinary_permissions(tmp_path):
    """atomic_dir's temp folder is 0700 and safetensors files 0600; the final folder must follow the umask."""
    import os

    from model.checkpoint import save_model
    from model.config import ModelConfig
    from model.model import CogniMamba

    umask = os.umask(0o022)
    try:
        folder = save_model(tmp_path / "m", CogniMamba(ModelConfig.from_name("nano", vocab_size=128)),
                            CharTokenizer.train(["a"]))
    finally:
        os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o644
