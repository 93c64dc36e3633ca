"""llama.cpp itself reads our GGUF exports as we do: same tokens for the same text, same greedy tokens.

    python bench/gguf_llama_cpp.py                                   # llama-cpp-python in this venv
    python bench/gguf_llama_cpp.py --llama-python /tmp/llamavenv/bin/python

Not a CI test: llama-cpp-python compiles llama.cpp for ~10 min on 2 cores, so it is optional. Each
llama.cpp run happens in a subprocess (its interpreter may be another venv's, and a crash there must
not end this check; quantized files run with n_batch=1, see bench/llama_cpp_peer.py). Checks, for
  - a nano model with a byte-level BPE trained here (tokenizer.ggml.pre 'gpt-2'), f32, random weights
  - SmolLM2-135M-Instruct exported at f32 (its dequantized weights) and at its own Q4_1 blocks:
tokenization of a few texts (with digits, Unicode, code, spaces) and greedy tokens after a chat prompt.
Prints one line per check and a JSON summary; exit status 1 if any check differs.

Measured (llama-cpp-python 0.3.36 built on AMD EPYC, 2 threads): all three ok; tokenization equal
everywhere; greedy equal for f32; on the Q4_1 file llama.cpp writes "L'Étoile, la Marseillaise, ..."
instead of "The capital of France is Paris.", exactly as it does on the original GGUF (Q8_0 exports
do the same, f16 and q4_0 ones answer sensibly). Not a fault of that build: the first token is a
near-tie ("L" 24.78 vs "The" 24.64 in our own `--quantize gguf` graph, which answers the same way),
and int8 activations on the quantized blocks tip it; held-out perplexity is equal (README).
The random nano model's greedy tokens are degenerate (all newlines); its check is the tokenization.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # `python bench/gguf_llama_cpp.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.llama_cpp_peer import run_peer  # noqa: E402

TEXTS = ["Hello world 12345 and 3.14159", "ñandú, Ünïcode, emoji 🦊🚀, مرحبا", "def f(x):\n\treturn x ** 2  # code\n\n",
         "   leading spaces and trailing   "]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]

def llama_cpp(python: str, path: Path, prompt: list[int], stop: list[int], n: int) -> dict:
    r = run_peer(python, {"path": str(path), "n_ctx": 512, "n_batch": 1, "threads": 2,
                          "tasks": [{"kind": "tokenize", "texts": TEXTS}, {"kind": "greedy", "ids": prompt, "stop": stop, "n": n}]})
    return r if "error" in r else {"tokens": r["results"][0], "greedy": r["results"][1]}


def check(name: str, python: str, path: Path, model, tok, n: int, source: Path | None = None) -> dict:
    """Tokenization and greedy tokens of llama.cpp on `path` against ours. With `source` (the GGUF the
    model was imported from), llama.cpp's greedy tokens on our file must equal its own on the source:
    the writer is judged by what llama.cpp does with the original, whatever its kernels do."""
    from serve.generate import TorchBackend, generate
    from serve.sampling import GREEDY, SamplingConfig

    prompt = tok.encode_chat(CHAT)
    ours_greedy = list(generate(TorchBackend(model), prompt, SamplingConfig(**{**GREEDY.__dict__, "max_new_tokens": n}),
                                stop_ids=tok.stop_ids))
    theirs = llama_cpp(python, path, prompt, tok.stop_ids, n)
    original = llama_cpp(python, source, prompt, tok.stop_ids, n) if source else None
    if "error" in theirs or (original and "error" in original):
        result = {"name": name, "ok": False, "error": (theirs.get("error") or original["error"])}
    else:
        same_tokens = theirs["tokens"] == [tok.encode(t) for t in TEXTS]
        result = {"name": name, "tokenization_equal": same_tokens, "greedy_equal": theirs["greedy"] == ours_greedy,
                  "greedy_tokens": len(ours_greedy), "ours": tok.decode(ours_greedy), "llama_cpp": tok.decode(theirs["greedy"])}
        if original:
            result["llama_cpp_on_source_file_equal"] = original["greedy"] == theirs["greedy"]
        result["ok"] = same_tokens and (result["greedy_equal"] or result.get("llama_cpp_on_source_file_equal", False))
    print(f"{'ok  ' if result['ok'] else 'DIFF'} {name}: {json.dumps({k: v for k, v in result.items() if k not in ('name', 'ok')}, ensure_ascii=False)}")
    return result


def main(llama_python: str = sys.executable, new_tokens: int = 32) -> int:
    import torch

    from export.gguf import export_gguf
    from model.config import ModelConfig
    from model.gguf import load_gguf
    from model.model import CogniMamba
    from model.tokenizer import train_bpe
    from model.weights import default_gguf, load_any

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        corpus = [t * 3 for t in TEXTS] * 30 + ["The quick brown fox jumps over the lazy dog. " * 5] * 30
        tok = train_bpe(corpus, 400)
        nano = CogniMamba(ModelConfig.from_name("nano", vocab_size=448)).eval()
        export_gguf(nano, tok, tmp / "nano.gguf", "f32", name="nano-bpe")
        results.append(check("nano, trained byte-level BPE, f32", llama_python, tmp / "nano.gguf", nano, tok, new_tokens))

        smol, smol_tok, meta = load_any("default")
        export_gguf(smol, smol_tok, tmp / "smol-f32.gguf", "f32", name=meta["name"], source=meta)
        results.append(check("SmolLM2-135M-Instruct, f32", llama_python, tmp / "smol-f32.gguf", smol, smol_tok, new_tokens))
        export_gguf(smol, smol_tok, tmp / "smol-auto.gguf", "auto", name=meta["name"], source=meta)
        back, _, _ = load_gguf(tmp / "smol-auto.gguf")  # the same weights, read back from our Q4_1 file
        results.append(check("SmolLM2-135M-Instruct, its own Q4_1 blocks", llama_python, tmp / "smol-auto.gguf",
                             back, smol_tok, new_tokens, source=default_gguf()))
    print(json.dumps(results, ensure_ascii=False, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-python", default=sys.executable, help="a Python with llama-cpp-python installed")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to compare")
    sys.exit(main(**{k.replace("-", "_"): v for k, v in vars(p.parse_args()).items()}))
