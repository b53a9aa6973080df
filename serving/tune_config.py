"""`ganforge tune`'s search space: the Candidate configurations of a model, the flags that list
them, and writing one into the model's config.pbtxt.

A Candidate is one point of instance count × `max_batch_size` × the dynamic batcher's
`max_queue_delay_microseconds`. `apply` puts it into a ModelConfig (every other field kept, the
warm-up samples and preferred batch sizes following the new max batch size); `write_choice`
writes the chosen one through the typed writer (`repository.write_config`) and updates the
manifest. serving/tune.py runs the search over these.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from ganforge.errors import RepositoryError, UsageError
from ganforge.serving import repository as repo

DEFAULT_INSTANCES = "1,2"
DEFAULT_QUEUE_DELAY_US = "0,500"
DEFAULT_CONCURRENCY = "1,4,16"
DEFAULT_SECONDS = 2.0
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


def _values(c: Candidate) -> dict:
    """`c` as the dict a configuration and a row carry."""
    return asdict(c)


def _fields(values: dict) -> dict:
    """A Candidate's fields out of a row or a configuration's values."""
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
