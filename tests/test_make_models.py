"""`make models` (scripts/make_models.sh) rebuilds what model_repository/ ships: each export's
run is trained by the script with the settings its manifest records."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "make_models.sh"
PLACEMENT = {"threads", "workers", "device"}   # where a run executes, not what it trains


def commands() -> list[list[str]]:
    text = re.sub(r"\\\n\s*", " ", SCRIPT.read_text())
    return [shlex.split(line)[1:] for line in text.splitlines() if line.startswith("$GF ")]


def exports() -> dict[str, str]:
    """{shipped model: the run directory exported into it}"""
    out = {}
    for argv in commands():
        if argv[0] == "export" and "--name" in argv and argv[1].startswith("runs/"):
            out[argv[argv.index("--name") + 1]] = argv[1]
    return out


def config(argv: list[str], monkeypatch):
    from ganforge.cli_train import train_config
    from ganforge.training import models

    assert argv[0] == "train", argv
    # the values only: a check would open the `--init` runs, which only `make models` writes
    monkeypatch.setattr(models.get(argv[1]).config, "check", lambda self: None)
    cfg, _ = train_config(argv[1], argv[2:])
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in PLACEMENT}


@pytest.mark.parametrize("name", sorted(exports()))
def test_the_script_trains_each_shipped_model_as_its_manifest_records(name, monkeypatch):
    run = exports()[name]
    trains = [a for a in commands() if a[0] == "train" and a[a.index("--out") + 1] == run]
    assert trains, f"{SCRIPT.name} exports {run} into {name} but never trains it"
    manifest = json.loads((ROOT / "model_repository" / name / "manifest.json").read_text())
    assert config(trains[-1], monkeypatch) == config(shlex.split(manifest["train_command"])[1:], monkeypatch), name
    for recorded in manifest.get("init_commands", []):   # the runs it was started from (--init)
        before = shlex.split(recorded)[1:]
        out = before[before.index("--out") + 1]
        ours = [a for a in commands() if a[0] == "train" and a[a.index("--out") + 1] == out]
        assert ours and config(ours[-1], monkeypatch) == config(before, monkeypatch), (name, out)


def test_the_script_exports_every_shipped_model_but_the_derived_graphs():
    shipped = {d.name for d in (ROOT / "model_repository").iterdir() if (d / "config.pbtxt").is_file()}
    derived = {n for n in shipped if n.endswith(("_generator", "_sampler"))}   # written with NAME's export
    assert set(exports()) == shipped - derived
