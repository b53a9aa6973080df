"""The GAN training doctor's reports: scores.png (`plot_scores`), doctor.md (`render_report`)
and doctor.json, written into a run directory when training ends (`write_run_report`) or
rebuilt later from one (`report_for_run`, behind `ganforge doctor RUN`).

The scores and diagnoses come from monitor.py; the interventions, restarts and weights kept
from doctor.py.
"""

from __future__ import annotations

import dataclasses

from ganforge.errors import UsageError
from ganforge.training.doctor import Doctor, Intervention, render_kept, render_restart
from ganforge.training.monitor import Diagnosis, Monitor, Thresholds, rediagnose

GAN_KINDS = ("dcgan", "mlpgan", "progan", "inpainter", "pix2pix")


def plot_scores(records: list[dict], diagnoses: list[Diagnosis], path, title: str = "",
                interventions: list[Intervention] = (), stages: list[dict] | None = None) -> None:
    """s_G and s_D over steps, each diagnosis a labelled vertical line (matplotlib, Agg); with
    `stages`, each stage's start a dotted line labelled with its side, fade-ins shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    ax.plot(steps, [r["s_D"] for r in records], label="s_D", color="tab:blue")
    ax.plot(steps, [r["s_G"] for r in records], label="s_G", color="tab:orange")
    if records and "diversity" in records[0]:
        ax.plot(steps, [min(r["diversity"], 1.5) / 1.5 for r in records], label="diversity / 1.5",
                color="tab:green", alpha=0.5, lw=1)
    colours = {"d_dominates": "red", "g_dominates": "purple", "mode_collapse": "black"}
    for d in diagnoses:
        ax.axvline(d.step, color=colours[d.failure], ls="--", lw=1)
        ax.text(d.step, 1.02, d.failure, rotation=90, va="bottom", ha="right", fontsize=7,
                color=colours[d.failure])
    if stages:
        ax.set_xlim(stages[0]["start"] - 1, max(stages[-1]["end"], steps[-1] if steps else 0))
    for span in stages or ():
        if span["start"] > 1:
            ax.axvline(span["start"], color="grey", ls=":", lw=1)
        if span.get("fade_end"):
            ax.axvspan(span["start"], span["fade_end"], color="grey", alpha=0.12, lw=0)
        ax.text(span["start"], 0.04, f" {span['side']} px", fontsize=7, color="dimgrey",
                va="bottom", ha="left")
    for i in {(i.step, i.action) for i in interventions}:
        ax.plot([i[0]], [0.02], marker="^", color="tab:red" if i[1] == "set" else "grey", ms=6)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("score")
    ax.set_title(title or "GAN scores", fontsize=9, pad=40 if diagnoses else 6)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _stage_table(stages: list[dict], records: list[dict], diagnoses: list[dict]) -> list[str]:
    lines = ["## Stages", "",
             "Scores are measured at the stage and alpha being trained (the held-out real images "
             "brought to the stage's side and blended as in training); each stage re-arms the "
             "detectors and \"early\" is judged from the stage's start.", "",
             "| stage | side | steps | fade-in | observations | last s_G | last s_D | diagnoses |",
             "|---|---|---|---|---|---|---|---|"]
    for span in stages:
        inside = lambda step: span["start"] <= step <= span["end"]
        obs = [r for r in records if inside(r["step"])]
        found = [f"{d['failure']} (step {d['step']})" for d in diagnoses if inside(d["step"])]
        fade = f"{span['start']}–{span['fade_end']}" if span.get("fade_end") else "-"
        last = (f"{obs[-1]['s_G']:.3f} | {obs[-1]['s_D']:.3f}") if obs else "- | -"
        lines.append(f"| {span['stage']} | {span['side']} px | {span['start']}–{span['end']} | {fade} | "
                     f"{len(obs)} | {last} | {', '.join(found) or 'none'} |")
    return lines + [""]


def render_report(title: str, records: list[dict], diagnoses: list[dict],
                  interventions: list[dict], mode: str, stages: list[dict] | None = None,
                  restarts: list[dict] = (), kept: dict | None = None) -> str:
    lines = [f"# Training doctor report: {title}", "", f"Doctor mode: {mode}. "
             f"{len(records)} observations on a fixed held-out batch.", ""]
    if stages:
        lines += _stage_table(stages, records, diagnoses)
    if records:
        first, last = records[0], records[-1]
        staged = "stage" in first
        head = "| step | stage | alpha | s_G | s_D | diversity | duplicates | modes |" if staged else \
            "| step | s_G | s_D | diversity | duplicates | modes |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        picks = records if len(records) <= 12 else [records[i * (len(records) - 1) // 11] for i in range(12)]
        for r in picks:
            modes = f"{r['modes']}/{r['n_modes']}" if "modes" in r else "-"
            where = f" {r.get('stage', '-')} | {r.get('alpha', float('nan')):.2f} |" if staged else ""
            lines.append(f"| {r['step']} |{where} {r['s_G']:.3f} | {r['s_D']:.3f} | "
                         f"{r.get('diversity', float('nan')):.3f} | {r.get('duplicates', float('nan')):.2f} | {modes} |")
        lines += ["", f"Final: s_G {last['s_G']:.3f}, s_D {last['s_D']:.3f} (first: s_G "
                  f"{first['s_G']:.3f}, s_D {first['s_D']:.3f}).", ""]
    lines += ["## Diagnoses", ""]
    if not diagnoses:
        lines += ["None: no failure condition held for long enough.", ""]
    for d in diagnoses:
        dd = Diagnosis(d["failure"], d["step"], d.get("evidence", {}), d["reason"], d.get("onset"))
        lines += ["```", dd.render(), "```", ""]
    lines += ["## Interventions", ""]
    if not interventions:
        lines += ["None." if mode == "auto" else f"None (mode {mode}: remedies are only advised).", ""]
    for i in interventions:
        lines.append("- " + Intervention(**i).render())
    restart = {i["knob"]: i["new"] for i in interventions if i["action"] == "restart"}
    if restarts:
        lines += ["", "## Restarts", "",
                  "Each rebuilt the networks with the changes, kept the weights whose shapes allow "
                  "(overlapping slices of resized layers), rebuilt the optimizers and went back to "
                  "the last checkpoint before the failure began.", ""]
        lines += ["- " + render_restart(r) for r in restarts]
    elif restart:
        lines += ["", "Restart decision (network changes for the next run): "
                  + ", ".join(f"{k}={v}" for k, v in restart.items())]
    if kept:
        lines += ["", "## Weights kept", "", render_kept(kept)]
    return "\n".join(lines).rstrip() + "\n"


def write_run_report(out, monitor: Monitor, doctor: Doctor, title: str = "",
                     stages: list[dict] | None = None) -> str:
    """Write scores.png, doctor.json and doctor.md into run directory `out`; return the report.
    `stages` (Progressive GAN): the stages trained, shown in the report and on the plot."""
    import json
    from pathlib import Path

    out = Path(out)
    diagnoses = [d.to_json() for d in monitor.diagnoses]
    interventions = [dataclasses.asdict(i) for i in doctor.interventions]
    plot_scores(monitor.records, monitor.diagnoses, out / "scores.png", title, doctor.interventions,
                stages)
    data = {"title": title, "mode": doctor.mode, "thresholds": dataclasses.asdict(monitor.th),
            "diagnoses": diagnoses, "interventions": interventions,
            "restart": doctor.restart_config(), "restarts": doctor.restarts, "kept": doctor.kept}
    if stages:
        data["stages"] = stages
    (out / "doctor.json").write_text(json.dumps(data, indent=2) + "\n")
    text = render_report(title, monitor.records, diagnoses, interventions, doctor.mode, stages,
                         doctor.restarts, doctor.kept)
    (out / "doctor.md").write_text(text)
    return text


def report_for_run(run, thresholds: Thresholds | None = None) -> str:
    """The report of a past run directory: from its metrics.jsonl (re-diagnosed with
    `thresholds` when given) and doctor.json. Raises UsageError on anything that is not one."""
    import json
    from pathlib import Path

    from ganforge.errors import CheckpointError

    run = Path(run)
    if run.is_file():
        if run.suffix == ".pt":
            from ganforge.training.gan import load_checkpoint

            payload = load_checkpoint(run)
            if payload.get("kind") not in GAN_KINDS:
                raise CheckpointError(f"doctor: {run} holds a {payload.get('kind')!r} model, not a GAN; "
                                      f"the doctor reads runs of {', '.join(GAN_KINDS)}")
            run = run.parent
        else:
            raise UsageError(f"doctor: {run} is a file; expected a run directory (runs/NAME)")
    if not run.is_dir():
        raise UsageError(f"doctor: {run} does not exist; expected a run directory (runs/NAME)")
    ckpt = run / "checkpoint.pt"
    if ckpt.is_file():
        from ganforge.training.gan import load_checkpoint

        kind = load_checkpoint(ckpt).get("kind")
        if kind not in GAN_KINDS:
            raise CheckpointError(f"doctor: {ckpt} holds a {kind!r} model, not a GAN; "
                                  f"the doctor reads runs of {', '.join(GAN_KINDS)}")
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise UsageError(f"doctor: {run} has no metrics.jsonl; is it a ganforge training run?")
    timeline = []   # the scores in the order observed, and each restart's rewind (Monitor.replay)
    for n, line in enumerate(metrics.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"doctor: {metrics} line {n} is not JSON") from None
        if isinstance(row, dict) and "s_G" in row and "s_D" in row:
            timeline.append({k: v for k, v in row.items() if k not in ("diagnoses", "rewound_to")})
        if isinstance(row, dict) and "rewound_to" in row:
            timeline.append({"rewound_to": row["rewound_to"]})
    scored = [r for r in timeline if "step" in r]
    if not scored:
        raise UsageError(f"doctor: {metrics} holds no s_G / s_D scores (trained with --doctor off?)")
    saved = json.loads((run / "doctor.json").read_text()) if (run / "doctor.json").is_file() else {}
    mode = saved.get("mode", "report")
    title = saved.get("title") or run.name
    stages = saved.get("stages")
    th = thresholds or (Thresholds(**saved["thresholds"]) if "thresholds" in saved else Thresholds())
    # the records the run kept (a restart drops the steps it abandoned), diagnosed again (stage by
    # stage for ProGAN); the run's own diagnoses are shown unless other thresholds are asked for
    replayed = rediagnose(timeline, th, stages[-1]["end"] if stages else scored[-1]["step"], stages)
    records = replayed.records
    diagnoses = saved.get("diagnoses") if thresholds is None else None
    if diagnoses is None:
        diagnoses = [d.to_json() for d in replayed.diagnoses]
    return render_report(title, records, diagnoses, saved.get("interventions", []), mode, stages,
                         saved.get("restarts", []), saved.get("kept"))
