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
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from ganforge.errors import GanforgeError, RepositoryError, ServerStartError, UsageError
from ganforge.serving import repository as repo

DEFAULT_INSTANCES = "1,2"
DEFAULT_QUEUE_DELAY_US = "0,500"
DEFAULT_CONCURRENCY = "1,4,16"
DEFAULT_SECONDS = 2.0
WARMUP_S = 0.5           # load at the highest concurrency before each configuration's figures
MAX_BATCH_SIZE = 1024    # export's bound on max_batch_size
MAX_INSTANCES = 64
MAX_CONCURRENCY = 1024
MAX_QUEUE_DELAY_US = 10_000_000


@dataclass(frozen=True)
class Candidate:
    """One serving configuration of a model."""

    instances: int                   # instance_group count (of every group)
    max_batch_size: int              # the largest batch the dynamic batcher forms
    max_queue_delay_us: int | None   # the batcher's wait for more requests; None: batcher off

    @property
    def label(self) -> str:
        delay = "off" if self.max_queue_delay_us is None else f"{self.max_queue_delay_us}us"
        return f"instances={self.instances} max_batch={self.max_batch_size} delay={delay}"

    @property
    def key(self) -> str:
        delay = "off" if self.max_queue_delay_us is None else self.max_queue_delay_us
        return f"i{self.instances}_b{self.max_batch_size}_d{delay}"


# -- arguments --------------------------------------------------------------------------------

# flag -> (smallest, largest, an example)
LIMITS = {"--instances": (1, MAX_INSTANCES, "1,2"), "--max-batch": (1, MAX_BATCH_SIZE, "8,16"),
          "--queue-delay-us": (0, MAX_QUEUE_DELAY_US, "0,100,500"),
          "--concurrency": (1, MAX_CONCURRENCY, "1,4,16")}


def parse_list(flag: str, text: str) -> list[int]:
    """`flag`'s comma-separated integers, each within LIMITS[flag], in order, duplicates dropped.

    Raises:
        UsageError: naming `flag`, the bad value and what is allowed.
    """
    minimum, maximum, example = LIMITS[flag]
    allowed = f"comma-separated integers in [{minimum}, {maximum}], e.g. {flag} {example}"
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise UsageError(f"{flag}: {text!r} is an empty list; give {allowed}")
    values = []
    for t in items:
        try:
            v = int(t)
        except ValueError:
            raise UsageError(f"{flag}: {t!r} is not allowed; give {allowed}") from None
        if not minimum <= v <= maximum:
            raise UsageError(f"{flag}: {v} is not allowed; give {allowed}")
        values.append(v)
    return list(dict.fromkeys(values))


def positive(flag: str, value: float) -> float:
    if not value > 0:
        raise UsageError(f"{flag}: {value} is not allowed; must be a number > 0")
    return value


def model_dir_of(repository: str | Path, model: str) -> Path:
    """The directory of `model` in `repository`; UsageError naming what there is otherwise."""
    root = Path(repository)
    if not root.is_dir():
        raise UsageError(f"--repo: {root} is not a directory")
    names = [d.name for d in sorted(root.iterdir()) if (d / "config.pbtxt").is_file()]
    if model not in names:
        raise UsageError(f"MODEL: {model!r} is not a model of {root}; choose from "
                         f"{', '.join(names) or 'none (no config.pbtxt found)'}")
    return root / model


# -- configurations ---------------------------------------------------------------------------

def shipped_candidate(cfg: mc.ModelConfig) -> Candidate:
    """The configuration a config.pbtxt holds, as a Candidate."""
    count = cfg.instance_group[0].count if cfg.instance_group else 1
    delay = (cfg.dynamic_batching.max_queue_delay_microseconds
             if cfg.HasField("dynamic_batching") else None)
    return Candidate(count or 1, cfg.max_batch_size, delay)


def apply(cfg: mc.ModelConfig, cand: Candidate) -> mc.ModelConfig:
    """A copy of `cfg` with `cand`'s values; every other field kept.

    What depends on max_batch_size follows it: a warm-up sample at the old largest batch (or
    above the new one) is moved to the new largest batch, as export writes them (batch 1 and
    the largest), and preferred batch sizes above it are dropped; Triton refuses either.
    """
    new = mc.ModelConfig()
    new.CopyFrom(cfg)
    old_max = cfg.max_batch_size
    new.max_batch_size = cand.max_batch_size
    if not new.instance_group:
        new.instance_group.add()
    for group in new.instance_group:
        group.count = cand.instances
    if cand.max_queue_delay_us is None:
        new.ClearField("dynamic_batching")
    else:
        new.dynamic_batching.max_queue_delay_microseconds = cand.max_queue_delay_us
        kept = [b for b in new.dynamic_batching.preferred_batch_size if b <= cand.max_batch_size]
        del new.dynamic_batching.preferred_batch_size[:]
        new.dynamic_batching.preferred_batch_size.extend(kept)
    warmups, seen = [], set()
    for w in new.model_warmup:
        w = _copy(w)
        if w.batch_size > cand.max_batch_size or (w.batch_size == old_max > 1):
            if w.name == f"warmup_batch_{w.batch_size}":
                w.name = f"warmup_batch_{cand.max_batch_size}"
            w.batch_size = cand.max_batch_size
        key = w.SerializeToString(deterministic=True)
        if key not in seen:   # max batch 1: the two samples are now one
            seen.add(key)
            warmups.append(w)
    del new.model_warmup[:]
    new.model_warmup.extend(warmups)
    return new


def _copy(w: mc.ModelWarmup) -> mc.ModelWarmup:
    out = mc.ModelWarmup()
    out.CopyFrom(w)
    return out


def grid(instances: list[int], max_batch: list[int], delays: list[int]) -> list[Candidate]:
    return [Candidate(i, b, d) for i in instances for b in max_batch for d in delays]


# -- measuring --------------------------------------------------------------------------------

def _prepare(model_dir: Path, cfg: mc.ModelConfig, cand: Candidate | None, dest: Path) -> Path:
    """`dest`/MODEL: a copy of the model directory; with `cand`, its config.pbtxt rewritten and
    the manifest dropped (the shipped copy keeps it, so the server still checks its files)."""
    target = dest / model_dir.name
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("__pycache__"))
    if cand is not None:
        repo.write_config(target, apply(cfg, cand))
        (target / repo.MANIFEST).unlink(missing_ok=True)
    return dest


def measure(repository: Path, model: str, workload, concurrencies: list[int], batch: int,
            seconds: float, log=print, prefix: str = "", settle=None):
    """Start the local server on `repository` (one model) and put the load on it at each
    concurrency. `settle` is called once the server is ready and before any load (the caller
    waits there for the previous configuration's server to exit, so its shutdown overlaps this
    start but never the figures).

    Returns:
        ({"start_s", "by_concurrency": {c: figures}}, the running server, for the caller to
        stop), or ({"error": why}, None) when the server did not start or the load failed.
    """
    from ganforge.benchmarks.serve import served
    from ganforge.serving.server import LocalServer, ServerOptions, free_port

    opts = ServerOptions(model_repository=repository, grpc_port=free_port(), http_port=free_port(),
                         metrics_port=free_port(), exit_timeout_s=10)
    t0 = time.perf_counter()
    try:
        server = LocalServer(opts).start()
    except ServerStartError as exc:
        log(f"{prefix}server did not start: {exc}")
        return {"error": f"server did not start: {exc}"}, None
    out: dict = {"start_s": round(time.perf_counter() - t0, 2), "by_concurrency": {}}
    try:
        if settle is not None:
            settle()
        served(server.grpc_url, model, workload, batch, max(concurrencies), min(WARMUP_S, seconds))
        for c in concurrencies:
            m = served(server.grpc_url, model, workload, batch, c, seconds)
            out["by_concurrency"][c] = m
            errors = f", {m['errors']} FAILED ({m['error_messages'][0]})" if m["errors"] else ""
            log(f"{prefix}concurrency {c:>3}: {m['images_per_s']:>9.1f} images/s  p50 {_ms(m['p50_ms'])}  "
                f"p99 {_ms(m['p99_ms'])}  ({m['requests']} requests{errors})")
    except Exception as exc:   # a configuration that serves no request is recorded, not fatal
        server.stop()
        log(f"{prefix}the load failed: {type(exc).__name__}: {exc}")
        return {"error": f"the load failed: {type(exc).__name__}: {exc}"}, None
    except BaseException:
        server.stop()
        raise
    return out, server


def _ms(v) -> str:
    return f"{v:8.1f} ms" if v is not None else "       - ms"


def _median(values: list):
    vals = [v for v in values if v is not None]
    return round(float(statistics.median(vals)), 3) if vals else None


def rows_of(configs: list[dict], concurrencies: list[int], p99_ms: float) -> list[dict]:
    """One row per configuration × concurrency: the median over rounds of each figure, the
    errors summed; `meets_p99` and the ratio to the shipped configuration at that concurrency."""
    rows = []
    for conf in configs:
        for c in concurrencies:
            per = [r["by_concurrency"][c] for r in conf["rounds"] if c in r.get("by_concurrency", {})]
            errors = sum(m["errors"] for m in per)
            row = {"config": conf["key"], "shipped": conf["shipped"], **conf["values"], "concurrency": c,
                   "images_per_s": _median([m["images_per_s"] for m in per]),
                   "p50_ms": _median([m["p50_ms"] for m in per]),
                   "p95_ms": _median([m["p95_ms"] for m in per]),
                   "p99_ms": _median([m["p99_ms"] for m in per]),
                   "requests": sum(m["requests"] for m in per), "errors": errors,
                   "error_messages": [e for m in per for e in m.get("error_messages", [])][:3],
                   "rounds_images_per_s": [m["images_per_s"] for m in per]}
            if conf.get("error"):
                row["error"] = conf["error"]
            row["valid"] = bool(per) and errors == 0 and not conf.get("error") and row["p99_ms"] is not None
            row["meets_p99"] = row["valid"] and row["p99_ms"] <= p99_ms
            rows.append(row)
    base = {r["concurrency"]: r for r in rows if r["shipped"] and r["valid"]}
    for r in rows:
        b = base.get(r["concurrency"])
        r["vs_shipped"] = (round(r["images_per_s"] / b["images_per_s"], 3)
                           if b and r["valid"] and b["images_per_s"] else None)
    return rows


def choose(rows: list[dict]) -> dict | None:
    """The row with the highest throughput among those meeting the latency limit (None: none);
    on a tie, the one listed first (the shipped configuration comes first)."""
    ok = [r for r in rows if r["meets_p99"]]
    return max(ok, key=lambda r: r["images_per_s"]) if ok else None


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


def served_versions(model_dir: Path, cfg: mc.ModelConfig) -> dict:
    """The version directories Triton loads for the model and the one a request without a
    version reaches (the newest loaded), with its precision where the manifest records one."""
    on_disk = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    policy = cfg.version_policy.WhichOneof("policy_choice") if cfg.HasField("version_policy") else "latest"
    if policy == "all":
        loaded = on_disk
    elif policy == "specific":
        loaded = [v for v in on_disk if v in set(cfg.version_policy.specific.versions)]
    else:
        loaded = on_disk[-max(1, cfg.version_policy.latest.num_versions):]
    out: dict = {"versions": loaded, "measured": max(loaded) if loaded else None}
    try:
        records = json.loads((model_dir / repo.MANIFEST).read_text()).get("versions") or {}
    except (OSError, ValueError):
        records = {}
    precision = (records.get(str(out["measured"])) or {}).get("precision")
    if precision:
        out["precision"] = precision
    return out


def _n(k: int, one: str, many: str | None = None) -> str:
    return f"{k} {one if k == 1 else (many or one + 's')}"


def _values(c: Candidate) -> dict:
    return asdict(c)


def _fields(values: dict) -> dict:
    return {k: values[k] for k in ("instances", "max_batch_size", "max_queue_delay_us")}


# -- the choice -------------------------------------------------------------------------------

def chosen_candidate(result: dict) -> Candidate | None:
    return Candidate(**_fields(result["best"])) if result.get("best") else None


def write_choice(model_dir: Path, cand: Candidate, result: dict, dry_run: bool,
                 expected_sha256: str | None = None) -> str:
    """Write `cand` into the model's config.pbtxt (or, with dry_run, only render it).

    Returns the unified diff of config.pbtxt ("" when nothing changes).

    Raises:
        RepositoryError: config.pbtxt changed during the search (`expected_sha256`), or the
            directory's files no longer match its manifest.
    """
    path = model_dir / "config.pbtxt"
    before = path.read_text()
    if expected_sha256 and repo.sha256(path) != expected_sha256:
        raise RepositoryError(f"{path}: changed while tune was measuring; not written (run tune again)")
    new = apply(repo.read_config(path), cand)
    after = repo.render(new)
    diff = "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        fromfile=f"{path}", tofile=f"{path} (tuned)"))
    if dry_run or not diff:
        return diff
    repo.verify_manifest(model_dir)   # refuse to re-bless a directory whose files changed
    repo.write_config(model_dir, new)
    manifest = model_dir / repo.MANIFEST
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        info.setdefault("files", {})["config.pbtxt"] = repo.sha256(path)
        best = result["best"]
        info["tuned"] = {
            **_fields(best), "p99_limit_ms": result["p99_limit_ms"], "concurrency": best["concurrency"],
            "images_per_s": best["images_per_s"], "p99_ms": best["p99_ms"],
            "best_vs_shipped": result["best_vs_shipped"], "before": result["shipped"],
            "load": result["load"],
            "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        manifest.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return diff


# -- report -----------------------------------------------------------------------------------

def table(result: dict) -> str:
    """Every row, one line each; the best marked `*`, rows over the limit `>`."""
    head = ("  config          instances  max_batch  delay_us  concurrency   images/s    p50 ms    p99 ms  "
            "vs shipped")
    lines = [head, "  " + "-" * (len(head) - 2)]
    best = result.get("best")
    for r in result["rows"]:
        is_best = best is not None and (r["config"], r["concurrency"]) == (best["config"], best["concurrency"])
        mark = "*" if is_best else (" " if r["meets_p99"] else ">")
        delay = "off" if r["max_queue_delay_us"] is None else r["max_queue_delay_us"]
        fig = lambda v, f: f.format(v) if v is not None else "-"
        note = (f"  {_reason(r['error'])}" if r.get("error")
                else f"  {r['errors']} failed requests" if r["errors"] else "")
        lines.append(f"{mark} {r['config']:<15} {r['instances']:>9}  {r['max_batch_size']:>9}  {delay!s:>8}  "
                     f"{r['concurrency']:>11}  {fig(r['images_per_s'], '{:9.1f}'):>9}  "
                     f"{fig(r['p50_ms'], '{:8.1f}'):>8}  {fig(r['p99_ms'], '{:8.1f}'):>8}  "
                     f"{fig(r['vs_shipped'], '{:10.3f}'):>10}{note}")
    lines.append(f"  (* best within p99 <= {result['p99_limit_ms']:g} ms; > over the limit or failed)")
    return "\n".join(lines)


def _reason(error: str, width: int = 90) -> str:
    """One short line of why a configuration failed: Triton's own error where the log has one."""
    lines = error.splitlines()
    for ln in lines:
        if "Failed to create instance" in ln or "failed to load" in ln:
            return ln.split('] "', 1)[-1][:width]
    return lines[0][:width] if lines else ""


def verdict(result: dict) -> list[str]:
    best, base = result["best"], result["shipped_best"]
    limit = f"p99 <= {result['p99_limit_ms']:g} ms"
    if best is None:
        p99s = [r["p99_ms"] for r in result["rows"] if r["valid"]]
        lowest = (f"; the lowest p99 measured was {min(p99s):.1f} ms" if p99s
                  else "; no configuration was measured without errors")
        return [f"no configuration meets {limit} at any concurrency measured{lowest}"]
    per_round = best["requests"] // max(1, len(best["rounds_images_per_s"]))
    few = (f" (over {per_round} requests a round: p99 is about the slowest; more --seconds for a "
           f"steadier tail)" if per_round < 100 else "")
    out = [f"best within {limit}: {Candidate(**_fields(best)).label} at concurrency {best['concurrency']}: "
           f"{best['images_per_s']:.1f} images/s, p50 {best['p50_ms']:.1f} ms, p99 {best['p99_ms']:.1f} ms{few}"]
    if base is None:
        out.append(f"the shipped configuration meets {limit} at no concurrency measured")
    else:
        out.append(f"shipped within {limit}: {base['images_per_s']:.1f} images/s at concurrency "
                   f"{base['concurrency']} (p99 {base['p99_ms']:.1f} ms): best / shipped = "
                   f"{result['best_vs_shipped']:.3f}")
    if result["best_vs_shipped_same_concurrency"] is not None and not best["shipped"]:
        out.append(f"at concurrency {best['concurrency']}: best / shipped = "
                   f"{result['best_vs_shipped_same_concurrency']:.3f}")
    return out


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
