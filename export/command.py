"""What the three export commands (export/onnx.py, export/gguf.py, export/hf.py) share: which
paths an export reads, so its --out never replaces them, and one `main` body that turns what a
user can cause into one line on stderr and exit code 2.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

# What a user can cause (a bad path, a refused --out, a model this project does not implement):
# told in one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError)


def read_paths(model: str | Path, *resolved) -> list[Path]:
    """The paths an export of `model` reads, which its --out must not be, hold or sit inside:
    what `model.weights` resolved it to (the model folder, the file a converted model came from),
    and the --model argument itself where it names a path (a .gguf or HF folder, too)."""
    return [Path(p) for p in (*resolved, model) if p and Path(p).exists()]


def run(write: Callable[[], str | None], out: str | Path, errors: tuple = USER_ERRORS) -> int:
    """A command's main: run `write`, print the line it returns (what it wrote), return 0; or
    print one `error: ...` line for `errors` and for an OSError (a read-only folder, a full disk)
    and return 2."""
    try:
        wrote = write()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 2
    if wrote:
        print(wrote)
    return 0
