"""The server's resident memory against its stated bound, under long streams and many schemas.

    python bench/memory_bound.py                                   # 8 streams x 4096 tokens, 40 schemas
    python bench/memory_bound.py --streams 2 --max-tokens 32 --schemas 3 --enum 2000    # a smoke
    python bench/memory_bound.py --model PATH --backend onnx

Starts `python app.py` (--max-batch, --cache-budget-mb passed on), reads the bound the server states
(cogni_mamba_memory_bound_bytes on /metrics, the same figure as its start-up line) and its resident
memory (cogni_mamba_resident_bytes, from the server's /proc/self/status), then: --streams streaming
chats at once, each of --max-tokens tokens; then --schemas requests, each with its own JSON schema (an
enum of --enum strings and a regex: a distinct compiled grammar each), four at a time. Reported: the
resident memory before, at its peak (VmHWM of the server's process), after the load, and --settle
seconds after it, each against the bound. Writes bench/results/memory_bound.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # `python bench/memory_bound.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(ROOT))

from bench.serve_load import free_port, start_app  # noqa: E402

RESULTS = ROOT / "bench" / "results"
STORY = "Write a very long story about a lighthouse keeper and the sea, chapter after chapter."
MB = 2**20


def gauges(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "metrics", timeout=30).read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith(("cogni_mamba_memory_bound_bytes", "cogni_mamba_resident_bytes"))}


def peak_bytes(pid: int) -> int:
    """VmHWM: the process's highest resident set so far."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def stream(client, model: str, max_tokens: int) -> int:
    chunks = client.chat.completions.create(model=model, messages=[{"role": "user", "content": STORY}],
                                            max_tokens=max_tokens, temperature=1.0, stream=True)
    return sum(1 for c in chunks if c.choices and c.choices[0].delta.content)


def schema_request(client, model: str, i: int, enum: int) -> str:
    schema = {"type": "object", "properties": {
        "pick": {"enum": [f"option-{i}-{j}" for j in range(enum)]},
        "code": {"type": "string", "pattern": f"^[a-z]{{2,{3 + i % 5}}}-{i}[0-9]{{3}}$"}},
        "required": ["pick", "code"]}
    fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Pick one."}],
                                       max_tokens=8, response_format=fmt)
    return r.choices[0].finish_reason


def main(model: str = "default", backend: str = "torch", streams: int = 8, max_tokens: int = 4096,
         schemas: int = 40, enum: int = 20000, max_batch: int = 8, cache_budget_mb: float = 2048,
         settle: float = 5.0) -> int:
    import openai

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = start_app(model, backend, port, "--max-batch", str(max_batch), "--cache-budget-mb", str(cache_budget_mb))
    try:
        client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=3600)
        served = client.models.list().data[0].id
        g = gauges(url)
        bound, rows = g["cogni_mamba_memory_bound_bytes"], {"before": g["cogni_mamba_resident_bytes"]}
        start = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            tokens = list(pool.map(lambda _: stream(client, served, max_tokens), range(streams)))
        with ThreadPoolExecutor(4) as pool:
            reasons = list(pool.map(lambda i: schema_request(client, served, i, enum), range(schemas)))
        rows["peak"] = peak_bytes(proc.pid)
        rows["after load"] = gauges(url)["cogni_mamba_resident_bytes"]
        time.sleep(settle)
        rows[f"{settle:g} s later"] = gauges(url)["cogni_mamba_resident_bytes"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"{model} on {backend}, --max-batch {max_batch}, --cache-budget-mb {cache_budget_mb:g}: "
          f"{streams} streams ({sum(tokens)} tokens), {schemas} schemas of {enum} strings "
          f"({reasons.count('stop')} complete) in {time.perf_counter() - start:.0f} s")
    print(f"  stated bound {bound / MB:,.0f} MB")
    for name, value in rows.items():
        print(f"  resident {name:>12}: {value / MB:,.0f} MB ({value / bound:.0%} of the bound)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"model": model, "backend": backend, "streams": streams, "max_tokens": max_tokens, "schemas": schemas,
           "enum": enum, "max_batch": max_batch, "cache_budget_mb": cache_budget_mb, "bound_bytes": bound,
           "resident_bytes": rows, "tokens": tokens}
    (RESULTS / "memory_bound.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / 'memory_bound.json'}")
    return 0 if rows["peak"] <= bound else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a model folder")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"], help="the app's backend")
    p.add_argument("--streams", type=int, default=8, help="streaming chats at once")
    p.add_argument("--max-tokens", type=int, default=4096, help="each stream's max_tokens")
    p.add_argument("--schemas", type=int, default=40, help="requests, each with a distinct JSON schema")
    p.add_argument("--enum", type=int, default=20000, help="strings in each schema's enum")
    p.add_argument("--max-batch", type=int, default=8, help="the app's --max-batch")
    p.add_argument("--cache-budget-mb", type=float, default=2048, help="the app's --cache-budget-mb")
    p.add_argument("--settle", type=float, default=5.0, help="seconds idle before the last reading")
    sys.exit(main(**vars(p.parse_args())))
