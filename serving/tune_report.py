"""`ganforge tune`'s results: the rows (one configuration at one concurrency, medians over the
rounds, the ratio to the shipped configuration), the choice among them, and the printed report
(the table and the verdict).
"""

from __future__ import annotations

import statistics

from ganforge.serving.tune_config import Candidate, _fields


# -- rows and the choice ----------------------------------------------------------------------

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
