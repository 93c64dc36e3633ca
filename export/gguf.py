"""Export a model as a llama-architecture GGUF file, for llama.cpp and Ollama.

    python export/gguf.py --model checkpoints/mine --out mine.gguf            # f32
    python export/gguf.py --model default --out smollm2.gguf                  # the source's own Q4_1 blocks
    python export/gguf.py --model checkpoints/mine --out mine-q8.gguf --type q8_0

The file carries the weights (llama.cpp's RoPE row order), the tokenizer with the split name
llama.cpp needs, the chat template and the stop tokens (model/gguf.py writes it). --out is
replaced only if this exporter wrote it (or with --force), and never when it is the model read.
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # `python export/gguf.py`: the repository root on sys.path, export/ off it
    _HERE = Path(__file__).resolve().parent  # (this file would shadow the `gguf` package)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402

from model.gguf import GGUF_TYPES, export_gguf  # noqa: E402
from model.weights import load_any  # noqa: E402


def main(model: str, out: str, gguf_type: str = "auto", force: bool = False) -> int:
    try:
        net, tok, meta = load_any(model)
        # what is read: the argument itself and, for a converted model, the file it came from
        read = [p for p in (model, meta.get("source")) if p and Path(p).exists()]
        if any(Path(out).expanduser().resolve() == Path(p).expanduser().resolve() for p in read):
            raise ValueError(f"--out {out} is the model being read; choose another --out")
        summary = export_gguf(net, tok, out, gguf_type, name=meta["name"], source=meta, force=force)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only folder, a full disk
        print(f"error: cannot write {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 2
    types = ", ".join(f"{n} {q}" for q, n in sorted(summary["types"].items()))
    print(f"wrote {summary['path']} ({summary['bytes'] / 2**20:.0f} MB; tensors: {types}; "
          f"tokenizer.ggml.pre {summary['pre']!r}): run it with llama.cpp (llama-cli -m ...) or Ollama")
    return 0


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="'default', a model folder, a training --out folder, a HF Llama folder, a .gguf")
    p.add_argument("--out", required=True, help="the .gguf file to write (replaced only if this exporter wrote it)")
    p.add_argument("--type", dest="gguf_type", default="auto", choices=GGUF_TYPES,
                   help="weight type: auto = each tensor at its source GGUF type (f32 for other models); norms stay f32")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not a GGUF this exporter wrote")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
