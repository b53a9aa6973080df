"""`ganforge bench serve`: the cost of serving, measured side by side in one run.

    ganforge bench serve --json serve.json [--png serve.png] [--repository model_repository]
                         [--url HOST:PORT] [--quick] [--no-perf-analyzer]

For each kind of model in the repository (generation by seed, raw generator, denoising,
inpainting), on the same ONNX file and machine:
  * in-process ONNX Runtime at batch 1/4/16/64 (the peer: what a user would do without a server);
  * the local embedded Triton over gRPC at batch 1/4/16/64 (concurrency 1 and 2);
  * batch-1 requests at client concurrency 1/4/16/32/64 with dynamic batching on, and off (a
    copy of the model whose config has no dynamic_batching, served beside it);
  * any other server given with --url, for the models it serves.
Load generators (_loadgen.py): tritonclient's asyncio gRPC client, and Triton's C++
perf_analyzer where installed (`make venv` puts it in the venv): the headline ratios are
measured with both inside the same in-process brackets, and the top-level keys are
perf_analyzer's when it ran.
Throughput is images/s; latency p50/p95/p99 per request. Also the ceiling (_ceiling.py): the
model's FLOPs per image (counted from the ONNX graph) and this machine's measured float32 matmul
throughput.

JSON keys: `served_vs_inprocess_ratio` (served batch 16, best of concurrency 1-2, over
in-process batch 16), `dynamic_batching_ratio` (batch-1 requests at concurrency 32, served,
over in-process batch 16), `p99_over_p50_at_c32`, per-kind tables, `ceiling`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ganforge.benchmarks._ceiling import matmul_flops, onnx_macs_per_image
from ganforge.benchmarks._loadgen import perf_analyzer_path, served, served_perf_analyzer
from ganforge.benchmarks._workloads import Workload, discover, percentiles, run_for
from ganforge.errors import UsageError

BATCHES = (1, 4, 16, 64)
CONCURRENCY = (1, 4, 16, 32, 64)


# -- the peers ----------------------------------------------------------------------------------

class InProcess:
    """The peer: the same ONNX file in this process with ONNX Runtime (for generation by seed,
    the same merged seed -> image graph the server runs)."""

    def __init__(self, w: Workload, onnx_path: str):
        import onnxruntime as ort

        self.w = w
        self.sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        self.rng = np.random.default_rng(0)

    def measure(self, batch: int, seconds: float) -> dict:
        feed = self.w.request(batch, self.rng)
        fn = lambda: self.sess.run(None, feed)
        fn()  # warm
        lat = run_for(seconds, fn)
        return {"images_per_s": round(batch * len(lat) / sum(lat), 2), **percentiles(lat)}


def inprocess(w: Workload, onnx_path: str, seconds: float) -> dict:
    peer = InProcess(w, onnx_path)
    return {b: peer.measure(b, seconds) for b in BATCHES if b <= w.max_batch}


def interleaved_ratios(url: str, w: Workload, onnx_path: str, seconds: float, rounds: int,
                       pa: str | None = None) -> dict:
    """The headline ratios, measured in rounds that bracket the served figures between in-process
    ones (in-process b16, served b16, in-process b16, served batch-1 at concurrency 32,
    in-process b16): each ratio divides by the mean of the in-process figures just before and
    just after it, so load from elsewhere on a shared machine that rises or falls during a round
    hits both sides alike. The median over rounds is reported with every round's value.

    Each served figure is taken with every load generator there is, one after the other inside
    the same bracket: the Python asyncio client and, where installed, perf_analyzer (C++). The
    top-level keys are perf_analyzer's where it ran (the server's cost with the cheapest client
    on the shared CPU), the Python client's otherwise; both are under `by_client`."""
    peer = InProcess(w, onnx_path)
    b16 = min(16, w.max_batch)
    # perf_analyzer sizes its windows from the Python client's figure at the same point
    clients = {"python": lambda b, c, hint: served(url, w.model, w, b, c, seconds)}
    if pa:
        clients["perf_analyzer"] = lambda b, c, hint: served_perf_analyzer(pa, url, w.model, w, b, c, seconds, hint)
    per = {name: {"served": [], "dyn": [], "p99": [], "requests": 0, "errors": 0, "error_messages": []}
           for name in clients}
    ip_rounds = []

    def take(name, m):
        per[name]["requests"] += m["requests"] or 0
        per[name]["errors"] += m["errors"]
        per[name]["error_messages"] += m.get("error_messages", [])
        return m

    for _ in range(rounds):
        ip_a = peer.measure(b16, seconds)["images_per_s"]
        s16 = {name: 0.0 for name in clients}
        for c in (1, 2):
            hint = None
            for name, fn in clients.items():
                m = take(name, fn(b16, c, hint))
                hint = hint or m["images_per_s"]
                s16[name] = max(s16[name], m["images_per_s"])
        ip_b = peer.measure(b16, seconds)["images_per_s"]
        c32, hint = {}, None
        for name, fn in clients.items():
            c32[name] = take(name, fn(1, 32, hint))
            hint = hint or c32[name]["images_per_s"]
        ip_c = peer.measure(b16, seconds)["images_per_s"]
        for name in clients:
            per[name]["served"].append(round(s16[name] / ((ip_a + ip_b) / 2), 3))
            per[name]["dyn"].append(round(c32[name]["images_per_s"] / ((ip_b + ip_c) / 2), 3))
            p50, p99 = c32[name]["p50_ms"], c32[name]["p99_ms"]
            per[name]["p99"].append(round(p99 / p50, 2) if p50 and p99 else None)
        ip_rounds.append([ip_a, ip_b, ip_c])
    med = lambda xs: float(np.median([x for x in xs if x is not None])) if any(x is not None for x in xs) else None
    by_client = {}
    for name, r in per.items():
        by_client[name] = {"served_vs_inprocess_ratio": med(r["served"]), "served_vs_inprocess_rounds": r["served"],
                           "dynamic_batching_ratio": med(r["dyn"]), "dynamic_batching_rounds": r["dyn"],
                           "p99_over_p50_at_c32": med(r["p99"]), "p99_over_p50_rounds": r["p99"],
                           "requests": r["requests"], "errors": r["errors"],
                           **({"error_messages": r["error_messages"][:3]} if r["errors"] else {})}
    headline = "perf_analyzer" if pa else "python"
    top = {k: v for k, v in by_client[headline].items() if k not in ("requests", "errors", "error_messages")}
    return {**top, "client": headline, "inprocess_batch16_rounds": ip_rounds, "by_client": by_client}


# -- one repository, every measurement ---------------------------------------------------------

def without_dynamic_batching(repository: Path, w: Workload, dest: Path) -> str:
    """Copy the model directory under `<model>_nobatch` with dynamic_batching removed."""
    from ganforge.serving import repository as repo

    src = repository / w.model
    name = f"{w.model}_nobatch"
    shutil.copytree(src, dest / name)
    (dest / name / "manifest.json").unlink(missing_ok=True)
    cfg = repo.read_config(dest / name / "config.pbtxt")
    cfg.name = name
    cfg.ClearField("dynamic_batching")
    repo.write_config(dest / name, cfg)
    return name


def bench_repository(repository: Path, seconds: float, quick: bool, urls: list[str],
                     rounds: int, pa: str | None = None) -> dict:
    from ganforge.serving.server import LocalServer, ServerOptions, free_port

    # the in-process peer needs the model's ONNX file (an ensemble or a plan has none here)
    workloads = {k: w for k, w in discover(repository).items() if w.onnx_path}
    if not workloads:
        raise UsageError(f"--repository: no servable ONNX models in {repository}")
    tmp = Path(tempfile.mkdtemp(prefix="ganforge-bench-"))
    try:
        for d in repository.iterdir():
            if d.is_dir() and (d / "config.pbtxt").is_file():
                shutil.copytree(d, tmp / d.name)
        nobatch = {}
        for kind, w in workloads.items():
            if w.max_batch > 0:
                nobatch[kind] = without_dynamic_batching(repository, w, tmp)
        opts = ServerOptions(model_repository=tmp, grpc_port=free_port(), http_port=free_port(),
                             metrics_port=free_port())
        results: dict = {"kinds": {}}
        with LocalServer(opts) as server:
            targets = {"embedded": server.grpc_url, **{f"url:{u}": u for u in urls}}
            for kind, w in workloads.items():
                print(f"[{kind}] {w.model}: in-process ONNX Runtime", flush=True)
                row = {"model": w.model, "inprocess": inprocess(w, w.onnx_path, seconds)}
                for label, url in targets.items():
                    print(f"[{kind}] {w.model}: served ({label})", flush=True)
                    by_batch = {}
                    for b in BATCHES:
                        if b > w.max_batch:
                            continue
                        runs = [served(url, w.model, w, b, c, seconds) for c in ((1, 2) if not quick else (2,))]
                        best = max(runs, key=lambda r: r["images_per_s"])
                        by_batch[b] = {**best, "concurrency": (1, 2)[runs.index(best)] if not quick else 2}
                    conc = {}
                    for c in CONCURRENCY:
                        conc[c] = served(url, w.model, w, 1, c, seconds)
                    row[label] = {"by_batch": by_batch, "batch1_by_concurrency": conc}
                    if pa and label == "embedded" and not quick:
                        print(f"[{kind}] {w.model}: served ({label}), perf_analyzer", flush=True)
                        row["embedded_perf_analyzer"] = {
                            "batch1_by_concurrency": {c: served_perf_analyzer(pa, url, w.model, w, 1, c, seconds,
                                                                              conc[c]["images_per_s"])
                                                      for c in CONCURRENCY}}
                    if kind in nobatch and label == "embedded":
                        print(f"[{kind}] {w.model}: served, dynamic batching off", flush=True)
                        row["embedded_no_dynamic_batching"] = {
                            "batch1_by_concurrency": {c: served(url, nobatch[kind], w, 1, c, seconds)
                                                      for c in CONCURRENCY}}
                print(f"[{kind}] {w.model}: headline ratios, {rounds} interleaved rounds", flush=True)
                row["headline"] = interleaved_ratios(server.grpc_url, w, w.onnx_path, seconds, rounds, pa)
                macs = onnx_macs_per_image(w.onnx_path)
                row["macs_per_image"] = macs
                results["kinds"][kind] = row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


# -- the report ---------------------------------------------------------------------------------

def summarise(results: dict, flops: float) -> dict:
    summary = {}
    for kind, row in results["kinds"].items():
        ip16 = row["inprocess"].get(16, row["inprocess"][max(row["inprocess"])])["images_per_s"]
        emb = row["embedded"]
        s16 = emb["by_batch"].get(16, emb["by_batch"][max(emb["by_batch"])])["images_per_s"]
        c32 = emb["batch1_by_concurrency"][32]
        best_ip = max(v["images_per_s"] for v in row["inprocess"].values())
        head = row["headline"]
        summary[kind] = {
            "served_vs_inprocess_ratio": head["served_vs_inprocess_ratio"],
            "dynamic_batching_ratio": head["dynamic_batching_ratio"],
            "p99_over_p50_at_c32": head["p99_over_p50_at_c32"],
            "client": head["client"],
            "by_client": {name: {k: v[k] for k in ("served_vs_inprocess_ratio", "dynamic_batching_ratio",
                                                   "p99_over_p50_at_c32")}
                          for name, v in head["by_client"].items()},
            "rounds": {k: v for k, v in head.items() if k.endswith("_rounds")},
            "inprocess_batch16_images_per_s": ip16,
            "served_batch16_images_per_s": s16,
            "served_batch1_c32_images_per_s": c32["images_per_s"],
            "gflop_per_image": round(2 * row["macs_per_image"] / 1e9, 4),
            "fraction_of_matmul_peak_inprocess_best": round(best_ip * 2 * row["macs_per_image"] / flops, 3),
        }
        if "embedded_no_dynamic_batching" in row:
            off = row["embedded_no_dynamic_batching"]["batch1_by_concurrency"][32]["images_per_s"]
            summary[kind]["dynamic_batching_speedup_at_c32"] = round(c32["images_per_s"] / off, 2) if off else None
    return summary


def markdown(results: dict) -> str:
    """The figures as Markdown tables: the headline per kind, then throughput and latency per
    batch size and per client concurrency."""
    ms = lambda r: f"{r['p50_ms']} / {r['p95_ms']} / {r['p99_ms']}"
    lines = ["| kind | model | served / in-process (b16) | dynamic batching ratio (b1, c32) | "
             "p99 / p50 at c32 | GFLOP / image | best in-process share of the matmul ceiling |",
             "|---|---|---|---|---|---|---|"]
    for kind, s in results["summary"].items():
        lines.append(f"| {kind} | {results['kinds'][kind]['model']} | {s['served_vs_inprocess_ratio']} | "
                     f"{s['dynamic_batching_ratio']} | {s['p99_over_p50_at_c32']} | {s['gflop_per_image']} | "
                     f"{s['fraction_of_matmul_peak_inprocess_best']} |")
    lines += ["", "The ratios by load generator (the table above uses the first available of "
              "perf_analyzer, the Python asyncio client):", "",
              "| kind | client | served / in-process (b16) | dynamic batching ratio (b1, c32) | p99 / p50 at c32 |",
              "|---|---|---|---|---|"]
    for kind, s in results["summary"].items():
        for name, c in s["by_client"].items():
            lines.append(f"| {kind} | {name} | {c['served_vs_inprocess_ratio']} | {c['dynamic_batching_ratio']} | "
                         f"{c['p99_over_p50_at_c32']} |")
    for kind, row in results["kinds"].items():
        lines += ["", f"**{kind}** (`{row['model']}`), images/s and p50 / p95 / p99 ms per request:", "",
                  "| batch | in-process ORT | served (embedded Triton, gRPC) |", "|---|---|---|"]
        for b, ip in row["inprocess"].items():
            sv = row["embedded"]["by_batch"].get(b)
            lines.append(f"| {b} | {ip['images_per_s']} ({ms(ip)}) | "
                         + (f"{sv['images_per_s']} ({ms(sv)}), concurrency {sv['concurrency']} |" if sv else "- |"))
        off = row.get("embedded_no_dynamic_batching", {}).get("batch1_by_concurrency", {})
        pa = row.get("embedded_perf_analyzer", {}).get("batch1_by_concurrency", {})
        lines += ["", "| batch-1 requests, concurrency | dynamic batching on | off | on, perf_analyzer |",
                  "|---|---|---|---|"]
        for c, on in row["embedded"]["batch1_by_concurrency"].items():
            o, q = off.get(c), pa.get(c)
            lines.append(f"| {c} | {on['images_per_s']} ({ms(on)}) | "
                         + (f"{o['images_per_s']} ({ms(o)}) | " if o else "- | ")
                         + (f"{q['images_per_s']} ({ms(q)}) |" if q else "- |"))
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results["kinds"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        row = results["kinds"][kind]
        xs = list(CONCURRENCY)
        ax.plot(xs, [row["embedded"]["batch1_by_concurrency"][c]["images_per_s"] for c in xs], "o-",
                label="served, batch-1 requests, dynamic batching (Python client)")
        if "embedded_perf_analyzer" in row:
            ax.plot(xs, [row["embedded_perf_analyzer"]["batch1_by_concurrency"][c]["images_per_s"] for c in xs],
                    "^-", label="served, the same, perf_analyzer")
        if "embedded_no_dynamic_batching" in row:
            ax.plot(xs, [row["embedded_no_dynamic_batching"]["batch1_by_concurrency"][c]["images_per_s"]
                         for c in xs], "s--", label="served, no dynamic batching")
        ip = row["inprocess"]
        ax.axhline(ip.get(16, ip[max(ip)])["images_per_s"], color="k", ls=":", label="in-process ORT, batch 16")
        ax.axhline(ip[1]["images_per_s"], color="grey", ls=":", label="in-process ORT, batch 1")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("client concurrency")
        ax.set_ylabel("images/s")
        ax.set_title(f"{kind}: {row['model']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ganforge bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", default="model_repository", type=Path)
    p.add_argument("--url", action="append", default=[], help="another Triton server to measure too")
    p.add_argument("--seconds", type=float, default=None, help="seconds per measurement")
    p.add_argument("--quick", action="store_true", help="1 s per measurement")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds for the ratios (5; quick 3)")
    p.add_argument("--no-perf-analyzer", action="store_true",
                   help="measure with the Python client only, even where perf_analyzer is installed")
    p.add_argument("--json", default="serve.json")
    p.add_argument("--png", default=None)
    a = p.parse_args(argv)
    seconds = a.seconds or (1.0 if a.quick else 3.0)
    t0 = time.perf_counter()
    flops = matmul_flops()
    rounds = a.rounds or (3 if a.quick else 5)
    pa = None if a.no_perf_analyzer else perf_analyzer_path()
    print("load generators: Python asyncio client" + (f", perf_analyzer ({pa})" if pa else
          " (perf_analyzer not installed: `make venv` installs it)"), flush=True)
    results = bench_repository(a.repository, seconds, a.quick, a.url, rounds, pa)
    results["clients"] = ["python"] + (["perf_analyzer"] if pa else [])
    results["ceiling"] = {"matmul_gflops": round(flops / 1e9, 1)}
    results["summary"] = summarise(results, flops)
    # the top-level keys the docs quote: generation by seed, the product's main path
    main = results["summary"].get("generate") or next(iter(results["summary"].values()))
    for key in ("served_vs_inprocess_ratio", "dynamic_batching_ratio", "p99_over_p50_at_c32", "client"):
        results[key] = main[key]
    failed = [m for m in _measurements(results) if m.get("errors")]
    results["errors"] = sum(m["errors"] for m in failed)
    results["seconds_per_measurement"] = seconds
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    png = Path(a.png) if a.png else Path(a.json).with_suffix(".png")
    plot(results, png)
    Path(a.json).with_suffix(".md").write_text(markdown(json.loads(json.dumps(results))))
    print(f"\n{'kind':<10} {'client':<14} {'served/in-process b16':>22} {'dyn.batch ratio c32':>20} "
          f"{'p99/p50 c32':>12} {'GFLOP/img':>10}")
    for kind, s in results["summary"].items():
        for name, c in s["by_client"].items():
            print(f"{kind:<10} {name:<14} {c['served_vs_inprocess_ratio']!s:>22} {c['dynamic_batching_ratio']!s:>20} "
                  f"{c['p99_over_p50_at_c32']!s:>12} {s['gflop_per_image']:>10}")
    print(f"matmul ceiling {results['ceiling']['matmul_gflops']} GFLOP/s; wall {results['wall_s']} s; "
          f"wrote {a.json}, {Path(a.json).with_suffix('.md')} and {png}")
    if failed:
        print(f"Error: {results['errors']} served requests failed, e.g. {failed[0]['error_messages'][0]}; "
              f"the figures above are not valid", file=sys.stderr)
        return 1
    return 0


def _measurements(results: dict):
    """Every served measurement of a result tree (the dicts that count requests)."""
    stack = [results["kinds"]]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "requests" in node and "errors" in node:
                yield node
            else:
                stack.extend(node.values())
