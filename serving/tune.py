"""`ganforge tune MODEL`: a search over one model's serving configuration, in the manner of
Triton's model_analyzer, on the real `tritonserver` (serving/server.py's launcher).

    ganforge tune denoiser_photos --p99-ms 200 --instances 1,2 --max-batch 8,16 \\
        --queue-delay-us 0,500 --concurrency 1,4,16 --seconds 3 --json tune.json [--dry-run]

Every candidate is one point of instance count × `max_batch_size` × the dynamic batcher's
`max_queue_delay_microseconds`. For each, the model's directory is copied into a temporary
repository, the candidate is written into the copy's config.pbtxt, and a server is started on
that copy alone (as a deployment of the model would run it). The load is benchmarks/serve.py's
asyncio gRPC load generator: at each concurrency c it keeps c requests of `--batch` items in
flight for `--seconds`. The shipped configuration is measured in the same run, the same way: the
baseline every row is compared with. With `--rounds N` every configuration is measured N times,
the order reversed every other round, and each figure is the median over the rounds.

A row is one configuration at one concurrency. The best row is the one with the highest
throughput whose p99 latency is within `--p99-ms` (and whose requests all succeeded); its
configuration is written into the model's config.pbtxt through the typed writer
(`repository.write_config`, Triton's own schema), every other field kept; the manifest's sha256
of config.pbtxt is updated and the choice recorded under `tuned`. `--dry-run` prints the change
and leaves the file alone. The repository itself is never touched during the search.

The pieces: the candidates, their flags and the writing of config.pbtxt are in tune_config.py;
one configuration's server and load in tune_measure.py; the rows, the choice and the printed
report in tune_report.py. This module runs the search (`tune`) and the command (`run_cli`), and
every name of the three stays importable from here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from ganforge.errors import GanforgeError, UsageError
from ganforge.serving import repository as repo
from ganforge.serving.tune_config import (DEFAULT_CONCURRENCY, DEFAULT_INSTANCES, DEFAULT_QUEUE_DELAY_US,
                                          DEFAULT_SECONDS, LIMITS, MAX_BATCH_SIZE, MAX_CONCURRENCY,
                                          MAX_INSTANCES, MAX_QUEUE_DELAY_US, Candidate, _fields, _values,
                                          apply, chosen_candidate, grid, model_dir_of, parse_list,
                                          positive, served_versions, shipped_candidate, write_choice)
from ganforge.serving.tune_measure import WARMUP_S, _prepare, measure
from ganforge.serving.tune_report import choose, rows_of, table, verdict

__all__ = [
    "DEFAULT_CONCURRENCY", "DEFAULT_INSTANCES", "DEFAULT_QUEUE_DELAY_US", "DEFAULT_SECONDS", "LIMITS",
    "MAX_BATCH_SIZE", "MAX_CONCURRENCY", "MAX_INSTANCES", "MAX_QUEUE_DELAY_US", "WARMUP_S", "Candidate",
    "apply", "choose", "chosen_candidate", "grid", "measure", "model_dir_of", "parse_list", "positive",
    "rows_of", "run_cli", "served_versions", "shipped_candidate", "table", "tune", "verdict", "write_choice",
]


def tune(repository: str | Path, model: str, p99_ms: float, instances: list[int] | None = None,
         max_batch: list[int] | None = None, queue_delay_us: list[int] | None = None,
         concurrency: list[int] | None = None, seconds: float = DEFAULT_SECONDS, batch: int = 1,
         rounds: int = 1, log=print) -> dict:
    """Measure the shipped configuration and every candidate of the grid on the local server.

    Args:
        repository: the model repository holding `model` (read, never written).
        model: the model directory to tune.
        p99_ms: the latency limit a row must meet to be chosen.
        instances, max_batch, queue_delay_us: the grid (defaults: 1 and 2 instances; the shipped
            max batch size and its half; 0 and 500 µs).
        concurrency: requests kept in flight, one figure each (default 1, 4, 16).
        seconds: load per figure.
        batch: items per request.
        rounds: measurements of every configuration (figures are medians over them).
        log: where progress lines go.

    Returns:
        The result: the configurations, every row, the best row and its ratio to the shipped
        configuration (see `choose`, `rows_of`).

    Raises:
        UsageError: an unknown model, a model that does not batch, a bad value.
        GanforgeError: the shipped configuration does not start or serve.
    """
    from ganforge.benchmarks._workloads import discover

    model_dir = model_dir_of(repository, model)
    cfg = repo.read_config(model_dir / "config.pbtxt")
    if cfg.platform == "ensemble" or cfg.max_batch_size <= 0:
        raise UsageError(f"MODEL: {model!r} has max_batch_size {cfg.max_batch_size}"
                         f"{' (an ensemble)' if cfg.platform == 'ensemble' else ''}; tune needs a model "
                         f"that Triton batches (max_batch_size > 0)")
    shipped = shipped_candidate(cfg)
    versions = served_versions(model_dir, cfg)
    instances = instances or parse_list("--instances", DEFAULT_INSTANCES)
    max_batch = max_batch or sorted({max(1, shipped.max_batch_size // 2), shipped.max_batch_size})
    queue_delay_us = queue_delay_us if queue_delay_us is not None else parse_list(
        "--queue-delay-us", DEFAULT_QUEUE_DELAY_US)
    concurrency = concurrency or parse_list("--concurrency", DEFAULT_CONCURRENCY)
    for flag, values in (("--instances", instances), ("--max-batch", max_batch),
                         ("--queue-delay-us", queue_delay_us), ("--concurrency", concurrency)):
        parse_list(flag, ",".join(map(str, values)))   # the same checks for calls from Python
    positive("--seconds", seconds)
    positive("--p99-ms", p99_ms)
    if rounds < 1:
        raise UsageError(f"--rounds: {rounds} is not allowed; must be >= 1")
    if batch < 1 or batch > min(max_batch + [shipped.max_batch_size]):
        raise UsageError(f"--batch: {batch} is not allowed; must be in "
                         f"[1, {min(max_batch + [shipped.max_batch_size])}] (the smallest max batch "
                         f"size measured, shipped or --max-batch)")

    candidates = [c for c in grid(instances, max_batch, queue_delay_us) if c != shipped]
    configs = [{"key": "shipped", "shipped": True, "values": _values(shipped), "rounds": []}]
    configs += [{"key": c.key, "shipped": False, "values": _values(c), "rounds": []} for c in candidates]
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    # Triton takes seconds to exit (its shutdown polls once a second): each server is stopped
    # in the background while the next one starts
    stopping: list[threading.Thread] = []

    def settle():
        while stopping:
            stopping.pop().join()

    tmp = Path(tempfile.mkdtemp(prefix="ganforge-tune-"))
    try:
        repos = [_prepare(model_dir, cfg, None, tmp / "shipped")]
        found = list(discover(repos[0]).values())
        if not found:
            raise UsageError(f"MODEL: {model!r} takes inputs {[i.name for i in cfg.input]} and returns "
                             f"{[o.name for o in cfg.output]}; tune builds requests for generation by seed "
                             f"(seed, index -> image), generators (latent), denoisers (image) and "
                             f"inpainters (image, mask)")
        workload = found[0]
        per_config = 5 + WARMUP_S + len(concurrency) * (seconds + 0.3)
        log(f"tune {model}: requests reach version {versions['measured']}"
            f"{' (' + versions['precision'] + ')' if versions.get('precision') else ''} of "
            f"{', '.join(map(str, versions['versions']))}")
        log(f"tune {model}: shipped {shipped.label}; {_n(len(candidates), 'candidate')} × "
            f"{_n(len(concurrency), 'concurrency', 'concurrencies')} ({', '.join(map(str, concurrency))}) "
            f"× {seconds:g} s × {_n(rounds, 'round')}, "
            f"batch {batch} per request: about {len(configs) * rounds * per_config / 60:.1f} min")
        repos += [_prepare(model_dir, cfg, cand, tmp / conf["key"])
                  for conf, cand in zip(configs[1:], candidates)]
        for r in range(rounds):
            order = list(range(len(configs)))
            if r % 2:
                order.reverse()
            for step, i in enumerate(order):
                conf = configs[i]
                if conf.get("error"):
                    continue
                prefix = (f"[round {r + 1}/{rounds} · {step + 1}/{len(configs)}] " if rounds > 1
                          else f"[{step + 1}/{len(configs)}] ")
                name = ("shipped " + shipped.label if conf["shipped"]
                        else Candidate(**_fields(conf["values"])).label)
                log(f"{prefix}{name}: starting tritonserver")
                m, server = measure(repos[i], model, workload, concurrency, batch, seconds, log,
                                    prefix + "  ", settle)
                if server is not None:
                    stopping.append(threading.Thread(target=server.stop, daemon=True))
                    stopping[-1].start()
                if "error" in m:
                    if conf["shipped"]:
                        raise GanforgeError(f"{model}: the shipped configuration, the baseline, "
                                            f"failed: {m['error']}")
                    conf["error"] = m["error"]
                    continue
                conf["rounds"].append(m)
    finally:
        settle()
        shutil.rmtree(tmp, ignore_errors=True)

    rows = rows_of(configs, concurrency, p99_ms)
    best = choose(rows)
    shipped_best = choose([r for r in rows if r["shipped"]])
    same_c = next((r for r in rows if r["shipped"] and best and r["concurrency"] == best["concurrency"]), None)
    return {
        "model": model, "repository": str(Path(repository)), "model_dir": str(model_dir),
        "p99_limit_ms": p99_ms,
        "load": {"generator": "benchmarks/serve.py served(): tritonclient asyncio gRPC, one event loop",
                 "batch": batch, "concurrency": concurrency, "seconds": seconds, "rounds": rounds,
                 "warmup_s": min(WARMUP_S, seconds)},
        "grid": {"instances": instances, "max_batch_size": max_batch, "max_queue_delay_us": queue_delay_us},
        "shipped": _values(shipped),
        "versions": versions,
        "configs": [{"config": c["key"], "shipped": c["shipped"], **c["values"],
                     "start_s": [m["start_s"] for m in c["rounds"]],
                     **({"error": c["error"]} if c.get("error") else {})} for c in configs],
        "rows": rows,
        "best": best,
        "shipped_best": shipped_best,
        # the two answers to "how much better": each configuration at its best within the limit,
        # and the two at the same concurrency
        "best_vs_shipped": (round(best["images_per_s"] / shipped_best["images_per_s"], 3)
                            if best and shipped_best and shipped_best["images_per_s"] else None),
        "best_vs_shipped_same_concurrency": best["vs_shipped"] if best else None,
        "shipped_at_best_concurrency": same_c,
        "errors": sum(r["errors"] for r in rows),
        "machine": {"cpus": os.cpu_count(), "load_average_start": [round(x, 2) for x in load_start],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def _n(k: int, one: str, many: str | None = None) -> str:
    return f"{k} {one if k == 1 else (many or one + 's')}"


def run_cli(args) -> int:
    """`ganforge tune` from parsed arguments: measure, report, write (or print) the choice.

    Exit 0: the best configuration is written (or printed, or already shipped); 1: no
    configuration meets the limit (nothing written) or a runtime failure; 2: a usage error.
    """
    lists = {
        "instances": parse_list("--instances", args.instances),
        "max_batch": parse_list("--max-batch", args.max_batch) if args.max_batch is not None else None,
        "queue_delay_us": parse_list("--queue-delay-us", args.queue_delay_us),
        "concurrency": parse_list("--concurrency", args.concurrency),
    }
    positive("--seconds", args.seconds)
    positive("--p99-ms", args.p99_ms)
    json_path = Path(args.json) if args.json else None
    if json_path is not None and not json_path.parent.exists():
        try:
            json_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--json: cannot create {json_path.parent} ({exc.strerror})") from exc
    model_dir = model_dir_of(args.repo, args.model)
    sha_before = repo.sha256(model_dir / "config.pbtxt")
    result = tune(args.repo, args.model, args.p99_ms, seconds=args.seconds, batch=args.batch,
                  rounds=args.rounds, log=lambda m: print(m, flush=True), **lists)
    result["command"] = " ".join(["ganforge", *sys.argv[1:]]) if Path(sys.argv[0]).name == "ganforge" else None
    result["dry_run"] = bool(args.dry_run)
    cand = chosen_candidate(result)
    diff, status = "", None
    if cand is not None:
        try:
            diff = write_choice(model_dir, cand, result, args.dry_run, sha_before)
        except GanforgeError as exc:
            status = f"Error: {exc}"
    written = cand is not None and diff and not args.dry_run and not status
    result["written"] = str(model_dir / "config.pbtxt") if written else None
    result["diff"] = diff
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(table(result))
    for line in verdict(result):
        print(line)
    failed = [r for r in result["rows"] if r["errors"]]
    if failed:
        print(f"{result['errors']} requests failed, in {len(failed)} rows (not eligible); first: "
              f"{failed[0]['config']} at concurrency {failed[0]['concurrency']}: "
              f"{(failed[0]['error_messages'] or ['?'])[0]}")
    if json_path is not None:
        print(f"wrote {json_path}")
    if status:
        print(status, file=sys.stderr)
        return 1
    if cand is None:
        print(f"Error: no configuration meets --p99-ms {args.p99_ms:g}; {model_dir / 'config.pbtxt'} "
              f"left unchanged (raise the limit, or try fewer instances, a shorter queue delay or "
              f"less concurrency)", file=sys.stderr)
        return 1
    path = model_dir / "config.pbtxt"
    if not diff:
        print(f"the shipped configuration is the best; {path} left unchanged")
    elif args.dry_run:
        print(f"--dry-run: {path} left unchanged; tune would write:")
        print(diff, end="")
    else:
        print(diff, end="")
        print(f"wrote {path} ({cand.label}) and its manifest's sha256")
    return 0
