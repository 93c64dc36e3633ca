"""Where one decode step goes: the step's parts as the engine takes them, and ONNX Runtime's kernels by type.

    python bench/step_profile.py --rows 1,8 --context 450 --steps 48 --rounds 3
    python bench/step_profile.py --llama-bin llama.cpp/build/bin   # llama.cpp's step beside ours

For each B in --rows, the app's CPU variant (serve/load.py's load_ort_backend("default")) with B
rows, each prefilled with `context` tokens of its own, then `steps` decode steps as the engine
takes them (serve/generate.decode_step, serve/sampling.sample on a SamplingBatch, each token
through a TextStream as a reply streams it), every part timed:

    graph        session.run_with_iobinding: ONNX Runtime's kernels and its scheduling between them
    binding      the rest of backend.forward: the attention mask, IOBinding, the logits out
    sample       greedy, then again with the default sampled settings (T 0.7, top_k 50, top_p 0.9,
                 repetition 1.1) and with T 0.7, top_p 0.9 alone: the same logits, each timed
    detokenize   TextStream.push of every row's token

Then the same steps on a session opened the same way (serve/ort_backend.session_options) with
ONNX Runtime's profiler on: kernel time by op type, as a share of the graph's time (what is left is
ONNX Runtime's own work between kernels). The profiled run is slower than the timed one (the
profiler records every kernel); only its shares are reported, and they overstate small kernels:
the profiler's own cost per kernel lands in them. So what a group of small nodes costs is measured
by taking it out: with --ablate, the same steps also run on a copy of the graph without the Q4_1
minimum's correction (its 4 nodes after each MatMulNBits; that graph's logits are wrong, only its
time is read), alternating with the real graph in every round. Medians per step; the CPU's name
beside them. With --llama-bin (llama.cpp's build/bin folder, built as the README shows),
llama.cpp's llama-batched-bench decodes the same GGUF at the same context and row counts, and its
step time stands beside ours. Writes bench/results/step_profile.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # `python bench/step_profile.py` puts bench/ first on sys.path: the repository root is needed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serve  # noqa: E402,F401  before torch, as in the server: OpenMP's wait policy (serve/__init__.py)
import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLED = {"greedy": dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
           "default sampled": dict(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1),
           "T 0.7, top_p 0.9": dict(temperature=0.7, top_k=0, top_p=0.9, repetition_penalty=1.0)}


class TimedSession:
    """The backend's session with run_with_iobinding timed (everything else passed through)."""

    def __init__(self, session):
        self.session, self.seconds = session, 0.0

    def run_with_iobinding(self, binding):
        start = time.perf_counter()
        self.session.run_with_iobinding(binding)
        self.seconds += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self.session, name)


def prompts(tokenizer, rows: int, context: int) -> list[list[int]]:
    """`rows` different prompts of `context` tokens (held-out text, each row from its own offset)."""
    text = (Path(__file__).resolve().parent / "data" / "romeo_and_juliet.txt").read_text()
    ids = tokenizer.encode(text)
    return [ids[r * context:(r + 1) * context] for r in range(rows)]


def run_steps(backend, tokenizer, rows: int, context: int, steps: int, session=None) -> dict:
    """`steps` decode steps of `rows` rows; per step: seconds of each part (lists). `session`: the
    one the decode steps run on (the prefill runs on the backend's own)."""
    from serve.batch import SamplingBatch
    from serve.generate import Sequence, capacity_for, decode_step, prefill
    from serve.sampling import SamplingConfig, SamplingRow, sample
    from serve.text_stream import TextStream

    cache = backend.new_cache(rows, capacity_for(context + steps + 1, backend.max_seq_len))
    seqs = []
    for row, ids in enumerate(prompts(tokenizer, rows, context)):
        logits = prefill(backend, cache, row, ids)
        seqs.append(Sequence(ids))
        seqs[-1].tokens.append(int(logits.argmax()))
    batches = {}
    for name, settings in SAMPLED.items():
        batches[name] = SamplingBatch(rows, backend.vocab_size)
        for row, s in enumerate(seqs):
            batches[name].add(row, SamplingRow(SamplingConfig(**settings, seed=row)), s.prompt)
    streams = [TextStream(tokenizer) for _ in seqs]
    parts = collections.defaultdict(list)
    plain = backend.session
    timed = backend.session = TimedSession(session or plain)
    try:
        for _ in range(steps):
            timed.seconds, start = 0.0, time.perf_counter()
            logits = decode_step(backend, cache, seqs)
            parts["graph"].append(timed.seconds)
            parts["binding"].append(time.perf_counter() - start - timed.seconds)
            for name, batch in batches.items():
                start = time.perf_counter()
                tokens = sample(logits, batch)
                parts[f"sample: {name}"].append(time.perf_counter() - start)
                if name == "greedy":
                    chosen = tokens
            start = time.perf_counter()
            for stream, token in zip(streams, chosen):
                stream.push(token)
            parts["detokenize"].append(time.perf_counter() - start)
            for row, (s, token) in enumerate(zip(seqs, chosen)):  # every batch follows the greedy reply
                s.tokens.append(token)
                for batch in batches.values():
                    batch.saw(row, token)
    finally:
        backend.session = plain
    return parts


def kernel_shares(backend, tokenizer, rows: int, context: int, steps: int) -> dict:
    """Kernel time by op type over `steps` profiled decode steps, as shares of the graph's run time."""
    import onnxruntime as ort

    from serve.ort_backend import session_options

    so = session_options()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path("/tmp") / f"step_profile_{rows}")
    profiled = ort.InferenceSession(str(backend.graph_path), so, providers=backend.session.get_providers())
    run_steps(backend, tokenizer, rows, context, steps, session=profiled)
    trace_file = Path(profiled.end_profiling())
    trace = json.loads(trace_file.read_text())
    trace_file.unlink()
    by_op, run_us, calls, nodes = collections.Counter(), 0, 0, 0
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
            nodes += 1
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            run_us, calls = run_us + e["dur"], calls + 1
    return {"kernel_share_by_op": {op: us / run_us for op, us in by_op.most_common()},
            "outside_kernels_share": 1 - sum(by_op.values()) / run_us, "nodes_per_call": nodes / calls}


def without_correction(graph: Path, out: Path) -> int:
    """Writes to `out` a copy of `graph` whose MatMulNBits outputs skip the Q4_1 minimum's
    correction (Reshape, ReduceSum, MatMul, Add: export/graph.py block_linear): a graph for timing
    what the correction costs, whose logits are wrong. Returns how many nodes it dropped."""
    import onnx

    model = onnx.load(str(graph))
    made_by = {out_name: node for node in model.graph.node for out_name in node.output}
    dropped = set()
    for add in model.graph.node:
        y, corr = (made_by.get(name) for name in add.input[:2]) if add.op_type == "Add" else (None, None)
        if y is None or corr is None or y.op_type != "MatMulNBits" or corr.op_type != "MatMul":
            continue
        sums = made_by[corr.input[0]]
        y.output[0] = add.output[0]  # the quantized product straight to the correction's consumers
        dropped |= {id(add), id(corr), id(sums), id(made_by[sums.input[0]])}
    kept = [node for node in model.graph.node if id(node) not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    onnx.save(model, str(out))
    return len(dropped)


def llama_cpp_steps(bin_dir: str, rows: list[int], context: int, steps: int) -> dict:
    """{rows: llama.cpp's decode step in ms} from llama-batched-bench on the default GGUF, each row
    after `context` tokens of its own (its text-generation figure: rows x steps tokens / time)."""
    import subprocess

    from model.weights import default_gguf
    from serve.ort_backend import physical_cores

    threads = str(physical_cores())
    r = subprocess.run([str(Path(bin_dir) / "llama-batched-bench"), "-m", str(default_gguf()), "-c",
                        str((context + steps + 16) * max(rows)), "-npp", str(context), "-ntg", str(steps),
                        "-npl", ",".join(map(str, rows)), "-t", threads, "-tb", threads, "--output-format", "jsonl"],
                       capture_output=True, text=True, timeout=1800)
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode or not lines:
        raise SystemExit(f"error: llama-batched-bench failed: {(r.stderr.strip().splitlines() or ['no output'])[-1]}")
    return {d["pl"]: 1000 * d["pl"] / d["speed_tg"] for d in lines}


def ablated_session(backend, folder: Path):
    """A session, opened as the backend's is, on the graph without the Q4_1 correction (or None
    when the graph has none)."""
    import onnxruntime as ort

    from serve.ort_backend import session_options

    path = folder / "model.onnx"
    if not without_correction(backend.graph_path, path):
        return None
    return ort.InferenceSession(str(path), session_options(), providers=backend.session.get_providers())


def main(rows: str = "1,8", context: int = 450, steps: int = 48, rounds: int = 3, llama_bin: str | None = None,
         ablate: bool = False) -> int:
    from bench import cpu_name
    from serve.load import load_ort_backend

    backend, tokenizer, meta = load_ort_backend("default")
    counts = [int(r) for r in rows.split(",")]
    report = {"variant": meta["variant"]["name"], "cpu": cpu_name(), "context": context, "steps": steps,
              "rounds": rounds, "threads": backend.session.get_session_options().intra_op_num_threads, "rows": {},
              "command": "python bench/step_profile.py " + " ".join(
                  a.replace(llama_bin, "LLAMA_BIN") if llama_bin else a for a in sys.argv[1:])}  # not this machine's path
    parts = {b: collections.defaultdict(list) for b in counts}
    peer = {b: [] for b in counts}
    scratch = tempfile.TemporaryDirectory() if ablate else None  # the ablated graph's file, while it runs
    ablated = ablated_session(backend, Path(scratch.name)) if scratch else None
    with torch.inference_mode():
        for _ in range(rounds):  # ours and llama.cpp in turn: a slow spell of the machine falls on both
            for b in counts:
                for name, seconds in run_steps(backend, tokenizer, b, context, steps).items():
                    parts[b][name] += seconds
                if ablated is not None:
                    parts[b]["graph without the Q4_1 correction"] += run_steps(
                        backend, tokenizer, b, context, steps, session=ablated)["graph"]
            if llama_bin:
                for b, step_ms in llama_cpp_steps(llama_bin, counts, context, steps).items():
                    peer[b].append(step_ms)
        for b in counts:
            report["rows"][b] = {"ms": {name: 1000 * statistics.median(v) for name, v in parts[b].items()},
                                 **kernel_shares(backend, tokenizer, b, context, steps)}
            if llama_bin:
                report["rows"][b]["llama_cpp_step_ms"] = statistics.median(peer[b])
    print(table(report))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step_profile.json").write_text(json.dumps({**report, "table": table(report)}, indent=2))
    return 0


def table(report: dict) -> str:
    rows = report["rows"]
    lines = ["| part of a step | " + " | ".join(f"{b} row{'s' * (b > 1)}: ms (share)" for b in rows) + " |",
             "|---|" + "---|" * len(rows)]
    step = {b: r["ms"]["graph"] + r["ms"]["binding"] + r["ms"]["sample: greedy"] + r["ms"]["detokenize"]
            for b, r in rows.items()}
    for name in next(iter(rows.values()))["ms"]:
        lines.append(f"| {name} | " + " | ".join(f"{r['ms'][name]:.2f} ({r['ms'][name] / step[b]:.0%})"
                                                 for b, r in rows.items()) + " |")
    lines.append("| greedy step (graph + binding + sample + detokenize) | "
                 + " | ".join(f"{step[b]:.2f}" for b in rows) + " |")
    if all("llama_cpp_step_ms" in r for r in rows.values()):
        lines.append("| llama.cpp's decode step, same GGUF and context (llama-batched-bench) | "
                     + " | ".join(f"{r['llama_cpp_step_ms']:.2f} (ours {step[b] / r['llama_cpp_step_ms']:.2f}x its time)"
                                  for b, r in rows.items()) + " |")
    ablated = "graph without the Q4_1 correction"
    if all(ablated in r["ms"] for r in rows.values()):
        cost = {b: r["ms"]["graph"] - r["ms"][ablated] for b, r in rows.items()}
        lines.append("| the Q4_1 correction's cost (graph - graph without it) | "
                     + " | ".join(f"{cost[b]:.2f} ({cost[b] / r['ms']['graph']:.0%} of the graph)" for b, r in rows.items())
                     + " |")
    lines += ["", "| graph: kernels by op type (share of the graph's time, profiled: small kernels overstated) | "
              + " | ".join(f"{b} row{'s' * (b > 1)}" for b in rows) + " |", "|---|" + "---|" * len(rows)]
    ops = list(next(iter(rows.values()))["kernel_share_by_op"])
    for op in ops[:12]:
        lines.append(f"| {op} | " + " | ".join(f"{r['kernel_share_by_op'].get(op, 0):.1%}" for r in rows.values()) + " |")
    lines.append("| (other ops) | " + " | ".join(f"{sum(r['kernel_share_by_op'].get(op, 0) for op in ops[12:]):.1%}"
                                                for r in rows.values()) + " |")
    lines.append("| between kernels (ONNX Runtime itself) | "
                 + " | ".join(f"{r['outside_kernels_share']:.1%}" for r in rows.values()) + " |")
    lines.append("| nodes run per step | " + " | ".join(f"{r['nodes_per_call']:.0f}" for r in rows.values()) + " |")
    return "\n".join(lines) + f"\n\n{report['variant']}; {report['context']} tokens of context; CPU: {report['cpu']}, " \
        f"{report['threads']} threads"


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8", help="comma-separated rows per step")
    p.add_argument("--context", type=int, default=450, help="tokens each row holds before the timed steps")
    p.add_argument("--steps", type=int, default=48, help="decode steps timed (and profiled) per row count")
    p.add_argument("--rounds", type=int, default=3, help="rounds of ours then llama.cpp's; medians")
    p.add_argument("--ablate", action="store_true", help="also time the graph without the Q4_1 minimum's "
                   "correction (its logits are wrong), alternating with the real one: what the correction costs")
    p.add_argument("--llama-bin", help="llama.cpp's build/bin folder (README: how to build it): "
                   "its llama-batched-bench's step beside ours")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
