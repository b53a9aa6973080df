"""`ganforge bench quantize`: FP32 vs INT8 (and FP16 / BF16) of the shipped models, side by side.

    ganforge bench quantize --json quantize.json [--quick] [--repository model_repository]
        [--models denoiser_photos,dcgan_shapes,...] [--precisions int8,fp16,bf16] [--seconds S]

For each model directory (default: every shipped model clients call: the denoiser, the inpainter
and the two generators by seed), the reduced-precision versions are made exactly as
`ganforge export MODEL_DIR --precision P` makes them (export/quantize.py, from the shipped FP32
graph: the repository ships no checkpoints) into a temporary repository beside a copy of the
FP32 model, then measured in one run:
  * quality: the task's figure for FP32 and each precision (denoiser: PSNR at sigma 25 on the
    held-out photos as `ganforge bench denoise` takes it; inpainter: hole PSNR on `ganforge bench
    inpaint`'s crops; generators: FD to held-out shapes with training/metrics.py's classifier);
  * in-process ONNX Runtime images/s at batch 1 and 16, each precision in the same round as
    FP32 (rounds interleave the peers; the ratio to FP32 is the median over rounds);
  * served images/s at batch 16 (two clients in flight) through the real tritonserver, each
    figure bracketed by in-process batch-16 runs of the same graph (served / in-process).
The machine is shared: ratios, not absolute times, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ("denoiser_photos", "dcgan_shapes", "progan_shapes", "fill_thinplate")
GOAL_SPEEDUP, GOAL_SERVED = 1.8, 0.85


def workload(model_dir: Path, name: str):
    """The benchmarks' request builder for a model directory, addressed as `name`."""
    from google.protobuf.json_format import MessageToDict

    from ganforge.benchmarks._workloads import DTYPES, Workload
    from ganforge.serving.repository import read_config

    cfg = MessageToDict(read_config(model_dir / "config.pbtxt"), preserving_proto_field_name=True)
    inputs = {i["name"]: (DTYPES[i["data_type"]], [int(x) for x in i["dims"]]) for i in cfg["input"]}
    kind = {frozenset({"seed", "index"}): "generate", frozenset({"latent"}): "generator",
            frozenset({"image", "mask"}): "inpaint", frozenset({"image"}): "denoise"}[frozenset(inputs)]
    return Workload(kind, name, inputs, int(cfg.get("max_batch_size", 0)), cfg["output"][0]["name"])


def fp32_copy(src: Path, dest: Path) -> Path:
    """Copy model directory `src` to `dest` with its FP32 version only (a shipped directory
    may also hold an INT8 version, which Triton would serve by default); the FP32 graph's path."""
    from ganforge.export.quantize import (_set_version_policy, fp32_version, read_manifest,
                                          record_version, version_records)

    v = str(fp32_version(src))
    shutil.copytree(src, dest, ignore=lambda d, names: [n for n in names if Path(d) == src
                                                        and n.isdigit() and n != v])
    info = read_manifest(dest)
    _set_version_policy(dest)
    record_version(dest, int(v), version_records(info).get(v, {"precision": "fp32"}), base=info)
    return dest / v / "model.onnx"


def images_per_s(sess, feed: dict, seconds: float) -> float:
    from ganforge.benchmarks.serve import run_for

    sess.run(None, feed)
    lat = run_for(seconds, lambda: sess.run(None, feed), min_iters=2)
    return len(next(iter(feed.values()))) * len(lat) / sum(lat)


def inprocess(paths: dict[str, Path], w, seconds: float, rounds: int) -> dict:
    """images/s per precision at batch 1 and 16, interleaved; speedup: median over rounds of
    the ratio to FP32 in the same round."""
    from ganforge.export.quantize import session

    sessions = {p: session(path) for p, path in paths.items()}
    rng = np.random.default_rng(0)
    out = {p: {} for p in sessions}
    for label, batch in (("b1", 1), ("b16", min(16, w.max_batch))):   # b16: or the model's largest
        feed = w.request(batch, rng)
        per = {p: [] for p in sessions}
        for _ in range(rounds):
            for p, s in sessions.items():
                per[p].append(images_per_s(s, feed, seconds))
        for p in sessions:
            out[p][f"{label}_images_per_s"] = round(float(np.median(per[p])), 2)
            out[p][f"{label}_speedup"] = round(float(np.median(np.divide(per[p], per["fp32"]))), 3)
            out[p][f"{label}_batch"] = batch
    return out


def served_ratio(url: str, path: Path, w, seconds: float, rounds: int) -> dict:
    """Served batch-16 images/s (two requests in flight) over in-process batch 16 of the same
    graph, measured before and after it; median over rounds."""
    from ganforge.benchmarks.serve import served
    from ganforge.export.quantize import session

    sess, b16 = session(path), min(16, w.max_batch)
    feed = w.request(b16, np.random.default_rng(1))
    ratios, figures, errors = [], [], 0
    for _ in range(rounds):
        a = images_per_s(sess, feed, seconds)
        m = served(url, w.model, w, b16, 2, seconds)
        b = images_per_s(sess, feed, seconds)
        errors += m["errors"]
        figures.append(m["images_per_s"])
        ratios.append(m["images_per_s"] / ((a + b) / 2))
    return {"served_b16_images_per_s": round(float(np.median(figures)), 2),
            "served_vs_inprocess": round(float(np.median(ratios)), 3),
            "served_vs_inprocess_rounds": [round(r, 3) for r in ratios], "errors": errors}


def goals(results: dict) -> dict:
    """The targets this benchmark checks, each with the figures it was judged on."""
    out = {}
    for model in ("denoiser_photos", "dcgan_shapes"):
        r = results.get(model, {}).get("int8")
        if not r or "error" in r:
            continue
        q = r.get("quality", {})
        out[f"{model}_int8_speedup_b16"] = {"value": r["inprocess"]["b16_speedup"], "goal": f">= {GOAL_SPEEDUP}",
                                            "met": r["inprocess"]["b16_speedup"] >= GOAL_SPEEDUP}
        out[f"{model}_int8_quality"] = {"value": q.get("loss"), "goal": f"<= {q.get('limit')} {q.get('unit')}",
                                        "met": bool(q.get("within_limit"))}
    for model, per in results.items():
        r = per.get("int8")
        if r and "served" in r:
            out[f"{model}_int8_served_vs_inprocess"] = {"value": r["served"]["served_vs_inprocess"],
                                                        "goal": f">= {GOAL_SERVED}",
                                                        "met": r["served"]["served_vs_inprocess"] >= GOAL_SERVED}
    return out


def markdown(results: dict) -> str:
    lines = ["| model | precision | quality (fp32 → this) | cost | max / mean abs diff (grey levels) | "
             "in-process b1 ×fp32 | in-process b16 ×fp32 | served / in-process b16 |",
             "|---|---|---|---|---|---|---|---|"]
    for model, per in results.items():
        for p, r in per.items():
            if "error" in r:
                lines.append(f"| {model} | {p} | {r['error'][:90]} | | | | | |")
                continue
            q, ip, sv = r.get("quality"), r["inprocess"], r.get("served", {})
            qual = f"{q['fp32']} → {q[p]}" if q and p != "fp32" else (str(q["fp32"]) if q else "")
            cost = f"{q['loss']:+.3f} {q['unit']}" if q and p != "fp32" else ""
            diff = f"{r['parity_fp32']['max_abs_diff']} / {r['parity_fp32']['mean_abs_diff']:.2f}" if "parity_fp32" in r else ""
            lines.append(f"| {model} | {p} | {qual} | {cost} | {diff} | {ip['b1_speedup']:.2f} | "
                         f"{ip['b16_speedup']:.2f} | {sv.get('served_vs_inprocess', '')} |")
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ganforge bench quantize", description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="quantize.json")
    ap.add_argument("--quick", action="store_true", help="short timings, one round, smaller quality sets")
    ap.add_argument("--repository", default="model_repository", help="where the FP32 models are")
    ap.add_argument("--models", default=None, help=f"comma-separated model directories (default {','.join(MODELS)})")
    ap.add_argument("--precisions", default="int8,fp16,bf16", help="compared with fp32")
    ap.add_argument("--seconds", type=float, default=None, help="per timing (default 3, --quick 0.5)")
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--no-serve", action="store_true", help="skip the served figures")
    a = ap.parse_args(argv)

    from ganforge.errors import GanforgeError
    from ganforge.export.quantize import PRECISIONS, export_from_directory
    from ganforge.serving.server import LocalServer, ServerOptions, free_port

    precisions = [p.strip() for p in a.precisions.split(",") if p.strip()]
    bad = [p for p in precisions if p not in PRECISIONS or p == "fp32"]
    if bad:
        print(f"Error: --precisions: {bad[0]!r} is not allowed; choose from int8, fp16, bf16")
        return 2
    repo = Path(a.repository)
    models = [m.strip() for m in a.models.split(",")] if a.models else [m for m in MODELS if (repo / m).is_dir()]
    missing = [m for m in models if not (repo / m / "config.pbtxt").is_file()]
    if missing or not models:
        print(f"Error: --models: {missing[0] if missing else '(none)'} is not a model directory of {repo}")
        return 2
    seconds = a.seconds or (0.5 if a.quick else 3.0)
    rounds = 1 if a.quick else 3
    t0 = time.perf_counter()
    report: dict = {"load_average_before": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
                    "cpu_flags": sorted({f for f in Path("/proc/cpuinfo").read_text().split()
                                         if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")}),
                    "quick": a.quick, "seconds_per_timing": seconds, "rounds": rounds,
                    "command": "ganforge bench quantize " + " ".join(argv)}
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="ganforge-quantize-") as tmp:
        tmp_repo = Path(tmp) / "model_repository"
        paths: dict[str, dict[str, Path]] = {}
        for m in models:
            fp32 = fp32_copy(repo / m, tmp_repo / m)
            results[m] = {"fp32": {}}
            paths[m] = {"fp32": fp32}
            for p in precisions:
                print(f"{m}: {p}", flush=True)
                try:
                    rec = export_from_directory(tmp_repo / m, tmp_repo, f"{m}_{p}", 1, p,
                                                calibration=a.calibration, quick=a.quick,
                                                log=lambda line: print("  " + line, flush=True))
                except (GanforgeError, ValueError, RuntimeError) as exc:   # recorded, the others go on
                    results[m][p] = {"error": str(exc)}
                    print(f"  {p}: {exc}", flush=True)
                    continue
                results[m][p] = {k: rec[k] for k in ("parity_fp32", "quality", "calibration") if k in rec}
                paths[m][p] = tmp_repo / f"{m}_{p}" / "1" / "model.onnx"
            q = next((r["quality"] for r in results[m].values() if "quality" in r), None)
            if q:
                results[m]["fp32"]["quality"] = {"metric": q["metric"], "fp32": q["fp32"]}
            w = workload(tmp_repo / m, m)
            for p, fig in inprocess(paths[m], w, seconds, rounds).items():
                results[m][p]["inprocess"] = fig
            print(f"{m}: in-process " + ", ".join(f"{p} b16 ×{results[m][p]['inprocess']['b16_speedup']}"
                                                  for p in paths[m]), flush=True)
        if not a.no_serve:
            opts = ServerOptions(model_repository=tmp_repo, grpc_port=free_port(), http_port=free_port(),
                                 metrics_port=free_port(), exit_timeout_s=5)
            server = LocalServer(opts).start()
            try:
                for m in models:
                    for p, path in paths[m].items():
                        name = m if p == "fp32" else f"{m}_{p}"
                        w = workload(tmp_repo / name, name)
                        results[m][p]["served"] = served_ratio(server.grpc_url, path, w, seconds, rounds)
                        print(f"{name}: served / in-process b16 {results[m][p]['served']['served_vs_inprocess']}",
                              flush=True)
            finally:
                server.stop()
    report.update(models=results, goals=goals(results),
                  load_average_after=[round(x, 2) for x in os.getloadavg()],
                  wall_s=round(time.perf_counter() - t0, 1))
    Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(results)
    Path(a.json).with_suffix(".md").write_text(md + "\n")
    print()
    print(md)
    print()
    for k, g in report["goals"].items():
        print(f"{k}: {g['value']} (goal {g['goal']}): {'met' if g['met'] else 'NOT met'}")
    print(f"load average {report['load_average_before']} -> {report['load_average_after']}; "
          f"wall {report['wall_s']} s; wrote {a.json} and {Path(a.json).with_suffix('.md')}")
    return 0
