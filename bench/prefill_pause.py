"""How long a long prompt stalls the chats already streaming (the Engine's chunked prefill).

    python bench/prefill_pause.py                      # a 4000-token prompt beside a running stream
    python bench/prefill_pause.py --prompt-tokens 8000

One chat streams greedy tokens through the Engine on the app's variant; once it has 20 tokens, a
second request with a prompt of N tokens arrives. Reported: the running stream's longest pause
between two tokens, and the long prompt's time to first token. Without chunked prefill the pause
is the whole prefill. Writes bench/results/prefill_pause.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

if __name__ == "__main__":  # `python bench/prefill_pause.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def main(prompt_tokens: int = 4000) -> int:
    from bench import cpu_name
    from serve.engine import Engine
    from serve.generate import PREFILL_CHUNK
    from serve.load import load_ort_backend
    from serve.sampling import SamplingConfig

    backend, _, meta = load_ort_backend("default")
    if prompt_tokens + 2 > backend.max_seq_len:
        print(f"error: --prompt-tokens must be below the context ({backend.max_seq_len})", file=sys.stderr)
        return 2
    greedy = lambda n: SamplingConfig(temperature=0, top_k=0, top_p=1, repetition_penalty=1, max_new_tokens=n)  # noqa: E731
    engine = Engine(backend, max_batch=8)
    list(engine.generate([5, 6, 7], greedy(4)))  # warm-up
    arrivals: list[float] = []

    def stream():
        for _ in engine.generate(list(range(100, 140)), greedy(100_000)):
            arrivals.append(time.perf_counter())
            if done.is_set():
                break

    done = threading.Event()
    runner = threading.Thread(target=stream)
    runner.start()
    while len(arrivals) < 20:
        time.sleep(0.001)
    start = time.perf_counter()
    next(engine.generate([1000 + i % 40000 for i in range(prompt_tokens)], greedy(2)))
    ttft = time.perf_counter() - start
    done.set()
    runner.join()
    engine.close()
    during = [b - a for a, b in zip(arrivals, arrivals[1:]) if b > start]
    result = {"prompt_tokens": prompt_tokens, "prefill_chunk": PREFILL_CHUNK, "variant": meta["variant"]["name"],
              "longest_pause_s": max(during), "long_prompt_ttft_s": ttft, "cpu": cpu_name()}
    print(f"{cpu_name()}, {meta['variant']['name']}: a {prompt_tokens}-token prompt paused the running stream "
          f"for at most {max(during):.2f} s; its own first token came after {ttft:.2f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prefill_pause.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=4000, help="length of the prompt that arrives")
    sys.exit(main(**{k.replace("-", "_"): v for k, v in vars(p.parse_args()).items()}))
