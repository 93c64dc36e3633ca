"""Exports travel: an ONNX folder opens in optimum's ORTModelForCausalLM as it is and gives our
greedy tokens, no ONNX, HF or GGUF export holds a path of the machine that wrote it, and each
carries the source's licence and base_model."""
import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
import yaml

from serve.generate import TorchBackend, generate
from serve.sampling import GREEDY
from model.weights import DEFAULT_REPO, cache_root, default_gguf
from tests.side_env import OPTIMUM_ENV, run_side, side_python


@pytest.fixture(scope="module")
def default_exports(tmp_path_factory, smollm2_export):
    """`default` exported by the three commands: (ONNX folder, HF folder, GGUF file)."""
    from export.gguf import main as gguf_main
    from export.hf import main as hf_main

    out = tmp_path_factory.mktemp("exports")
    assert hf_main("default", str(out / "hf")) == 0
    assert gguf_main("default", str(out / "smol.gguf")) == 0
    return smollm2_export("fp32", None, False), out / "hf", out / "smol.gguf"


def test_no_export_holds_this_machines_paths(default_exports):
    onnx_dir, hf_dir, gguf_file = default_exports
    local = {str(Path.home()), str(cache_root()), tempfile.gettempdir(), str(default_gguf().parent),
             str(onnx_dir.parent), str(hf_dir.parent)}
    local |= {str(Path(p).resolve()) for p in local}
    files = sorted(onnx_dir.iterdir()) + sorted(hf_dir.iterdir()) + [gguf_file]
    assert len(files) > 12
    for f in files:
        data = f.read_bytes()
        assert not [p for p in local if p.encode() in data], f  # an uploaded folder would publish them


def test_exports_of_default_carry_its_licence_and_base_model(default_exports):
    import gguf

    onnx_dir, hf_dir, gguf_file = default_exports
    card = yaml.safe_load((hf_dir / "README.md").read_text().split("---\n")[1])
    assert card["license"] == "apache-2.0" and card["base_model"] == [DEFAULT_REPO] and card["language"] == ["en"]
    src, out = gguf.GGUFReader(default_gguf()), gguf.GGUFReader(gguf_file)
    for key in ("general.license", "general.languages", "general.organization", "general.size_label",
                "general.basename", "general.finetune"):
        assert out.fields[key].contents() == src.fields[key].contents(), key
    assert out.fields["general.base_model.0.repo_url"].contents() == f"https://huggingface.co/{DEFAULT_REPO}"
    meta = json.loads((onnx_dir / "onnx_meta.json").read_text())
    assert meta["card"]["license"] == "apache-2.0" and meta["card"]["base_model"] == [DEFAULT_REPO]


OPTIMUM_SCRIPT = """
import json, sys, torch
from optimum.onnxruntime import ORTModelForCausalLM
model = ORTModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.tensor([json.loads(sys.argv[2])])
out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(sys.argv[3]), do_sample=False)
print(json.dumps({"model_type": model.config.model_type, "tokens": out[0, ids.shape[1]:].tolist()}))
"""


@pytest.mark.slow
def test_optimum_opens_the_onnx_export_and_gives_our_greedy_tokens(default_exports, smollm2, tmp_path):
    """optimum-onnx pins transformers<4.58, so it runs in a venv of its own (tests/side_env.py)."""
    onnx_dir = default_exports[0]
    # transformers once took a folder whose name holds "opt" for an OPT model when config.json
    # had no model_type: the name must not matter
    folder = tmp_path / "smollm2-opt"
    folder.symlink_to(onnx_dir, target_is_directory=True)
    model, tok, _ = smollm2
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    greedy = dataclasses.replace(GREEDY, max_new_tokens=24)
    ours = list(generate(TorchBackend(model), ids, greedy, stop_ids=tok.stop_ids))
    r = run_side(side_python(*OPTIMUM_ENV), OPTIMUM_SCRIPT, str(folder), json.dumps(ids), str(greedy.max_new_tokens))
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["model_type"] == "llama"
    # optimum also yields the stop token that ends the reply; ours stops without yielding it
    theirs = got["tokens"][:len(ours) + 1]
    assert len(ours) >= 4 and theirs[:len(ours)] == ours and (len(theirs) == len(ours) or theirs[-1] in tok.stop_ids)
