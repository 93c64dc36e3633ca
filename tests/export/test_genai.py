"""An export folder opens in onnxruntime-genai as it is: genai_config.json describes the graph, and
genai's greedy tokens and chat template are ours."""
import json

import pytest

from export.genai import GRAPH_IO, genai_config
from serve.ort_backend import OrtBackend
from serve.generate import generate
from serve.sampling import GREEDY, SamplingConfig
from model.config import ModelConfig
from model.tokenizer import load_tokenizer, train_bpe

og = pytest.importorskip("onnxruntime_genai")  # tests/requirements.txt installs it beside onnxruntime

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def genai_greedy(folder, ids, n):
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens([ids])
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(ids):]


def ours_greedy(folder, ids, n):
    """What `python -m serve.cli --greedy` generates: stops (unprinted) on the tokenizer's stop ids."""
    cfg = SamplingConfig(**{**GREEDY.__dict__, "max_new_tokens": n})
    return list(generate(OrtBackend(folder), ids, cfg, stop_ids=load_tokenizer(folder).stop_ids))


@pytest.fixture(scope="module")
def nano_bpe_dir(model_folder):
    return model_folder(["The quick brown fox jumps over the lazy dog. 12345"] * 50, bpe_vocab=300, vocab_size=320)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_genai_generates_our_greedy_tokens_nano(nano_bpe_dir, tmp_path, fused):
    from export.onnx import export_onnx

    out = tmp_path / "export"
    export_onnx(nano_bpe_dir, out, optimize=fused, log=lambda *_: None)
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["inputs"] == GRAPH_IO["inputs"]
    assert cfg["search"]["past_present_share_buffer"] is False  # the graph concatenates past and new
    tok = load_tokenizer(out)
    ids = tok.encode_chat(CHAT)
    assert genai_greedy(out, ids, 12) == ours_greedy(out, ids, 12)


def test_genai_generates_the_cli_text_smollm2(smollm2_export):
    folder = smollm2_export("fp32", None, True)
    tok = load_tokenizer(folder)
    ids = tok.encode_chat(CHAT)
    ours = ours_greedy(folder, ids, 32)
    theirs = genai_greedy(folder, ids, 32)
    # genai stops on <|im_end|> (eos_token_id lists the stop ids) and leaves it out, as we do
    assert theirs == ours and 5 <= len(ours) < 32
    assert "Paris" in tok.decode(theirs)
    genai_tok = og.Tokenizer(og.Model(str(folder)))
    assert genai_tok.apply_chat_template(json.dumps(CHAT), add_generation_prompt=True) == tok.render_chat(CHAT)
    assert genai_tok.encode(tok.render_chat(CHAT)).tolist() == ids


def test_char_exports_get_no_genai_config(nano_export):
    folder = nano_export("fp32", None, True)  # nano_dir has a char tokenizer: genai cannot tokenize it
    assert not (folder / "genai_config.json").exists()


def test_config_follows_the_graph_io():
    """One function takes the I/O description: a shared-buffer graph flips the flag and names there."""
    tok = train_bpe(["abc def"] * 10, 270)
    shared = {**GRAPH_IO, "past_present_share_buffer": True}
    cfg = genai_config(ModelConfig.from_name("nano", vocab_size=288), tok, shared)
    assert cfg["search"]["past_present_share_buffer"] is True
    assert cfg["model"]["decoder"]["num_key_value_heads"] == 2 and cfg["model"]["eos_token_id"] == tok.stop_ids
