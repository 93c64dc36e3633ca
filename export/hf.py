"""Export a model as a HuggingFace Llama folder: transformers, vLLM, TGI and llama.cpp's converter read it.

    python export/hf.py --model checkpoints/mine --out hf/mine
    python export/hf.py --model default --out hf/smollm2 --dtype bfloat16

Writes into --out: config.json, model.safetensors (a tied head stored once), generation_config.json
and the tokenizer files. --out is replaced only if it is an earlier HF export (or with --force), and
never when it is, holds or sits inside the model being read.
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # `python export/hf.py`: the repository root on sys.path, export/ off it
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402

import torch  # noqa: E402

from model.hf import export_hf  # noqa: E402
from model.weights import load_any  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")


def main(model: str, out: str, dtype: str = "float32", force: bool = False) -> int:
    try:
        net, tokenizer, meta = load_any(model)
        sources = [meta["path"]] + ([Path(model)] if Path(model).exists() else [])  # a .gguf or HF folder, too
        folder = export_hf(net, tokenizer, out, getattr(torch, dtype), meta, force=force, sources=sources)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full disk
        print(f"error: cannot write {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {folder}: load it with transformers.AutoModelForCausalLM.from_pretrained")
    return 0


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="'default', a model folder, a training --out folder, a HF folder or a .gguf")
    p.add_argument("--out", required=True, help="the folder to write (an earlier HF export there is replaced)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weight dtype")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not an earlier HF export")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
