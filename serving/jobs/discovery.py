"""What a batch job works on: the items of a folder or a `.jsonl` manifest, the entries that
cannot become items (with their reasons), and the stable split of the items into shards."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ganforge.errors import UsageError
from ganforge.images import IMAGE_SUFFIXES

MASK_SUFFIX = "_mask"


# -- items --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    key: str            # output path relative to OUTPUT_DIR (posix): the item's identity
    image: Path
    mask: Path | None   # None: no mask was found (the item fails with that reason)
    output: Path


def failure(key: str, image, reason: str, mask=None) -> dict:
    """One line of failures.jsonl."""
    return {"key": key, "image": str(image) if image else None,
            "mask": str(mask) if mask else None, "reason": reason}


def _find_mask(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}{MASK_SUFFIX}", stem):
        for suffix in (".png", *IMAGE_SUFFIXES):
            p = folder / f"{name}{suffix}"
            if p.is_file():
                return p
    return None


def discover(input: str | Path, output_dir: str | Path, masks: str | Path | None = None
             ) -> tuple[list[Item], list[dict]]:
    """The items of a job and the entries that cannot become items (with reasons).

    Args:
        input: a folder of images (masks `photo_mask.png` beside `photo.jpg`, or in `masks`
            at the same relative path, named `photo_mask.*` or `photo.*`), or a `.jsonl`
            manifest of {"image", "mask", "output"} lines (paths relative to the manifest's
            folder; `output` relative to `output_dir`, default the image's name as .png).
        output_dir: where outputs go, mirroring the inputs' relative paths, always as PNG so the
            pixels outside the holes stay byte-identical.
        masks: a separate folder of masks (folder input only).
    """
    input, output_dir = Path(input), Path(output_dir)
    if input.is_file() and input.suffix == ".jsonl":
        if masks is not None:
            raise UsageError("--masks: not used with a .jsonl manifest (each line names its mask)")
        return _from_manifest(input, output_dir)
    if not input.is_dir():
        raise UsageError(f"INPUT: {input} is neither a folder nor a .jsonl manifest")
    if masks is not None and not Path(masks).is_dir():
        raise UsageError(f"--masks: {masks} is not a folder")
    out_abs = output_dir.resolve()
    items, bad, seen = [], [], {}
    for path in sorted(input.rglob("*")):
        rel = path.relative_to(input)
        if (not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES
                or any(part.startswith(".") for part in rel.parts)
                or out_abs == path.resolve().parent or out_abs in path.resolve().parents):
            continue
        if masks is None and path.stem.endswith(MASK_SUFFIX):
            continue
        key = rel.with_suffix(".png").as_posix()
        mask = _find_mask(Path(masks) / rel.parent if masks is not None else path.parent, path.stem)
        if masks is None and mask == path:
            mask = None
        if key in seen:
            bad.append(failure(key, path, f"output {key} is also the output of {seen[key]}; "
                                          f"rename one of them", mask))
            continue
        seen[key] = path
        items.append(Item(key, path, mask, output_dir / key))
    return items, bad


def _from_manifest(manifest: Path, output_dir: Path) -> tuple[list[Item], list[dict]]:
    base = manifest.parent
    items, bad, seen = [], [], {}
    try:
        lines = manifest.read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"INPUT: cannot read {manifest} ({exc.strerror})") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{manifest.name}:{n}"
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise ValueError('needs an object with a string "image"')
        except ValueError as exc:
            bad.append(failure(where, None, f"{where}: not a manifest line ({exc})"))
            continue
        image = base / entry["image"]
        mask = base / entry["mask"] if isinstance(entry.get("mask"), str) else None
        out = entry.get("output") or Path(entry["image"]).with_suffix(".png").as_posix()
        rel = Path(out)
        if rel.is_absolute() or ".." in rel.parts:
            bad.append(failure(where, image, f"{where}: output {out!r} must be a relative path "
                                             f"inside OUTPUT_DIR", mask))
            continue
        key = rel.as_posix()
        if key in seen:
            bad.append(failure(key, image, f"{where}: output {key} is also the output of line "
                                           f"{seen[key]}", mask))
            continue
        seen[key] = n
        items.append(Item(key, image, mask, output_dir / rel))
    return items, bad


# -- sharding -----------------------------------------------------------------------------------

def shard_of(key: str, num_shards: int) -> int:
    """The shard an item belongs to: a stable hash of its output path, the same on every
    machine, Python version and run."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % num_shards


def shard(items: list, index: int, num_shards: int, key=lambda it: it.key) -> list:
    if not 0 <= index < num_shards:
        raise UsageError(f"--shard-index: {index} is not allowed; must be in [0, {num_shards - 1}]")
    return [it for it in items if shard_of(key(it), num_shards) == index]


def shard_defaults(index: int | None, num_shards: int | None, env=os.environ) -> tuple[int, int]:
    """--shard-index defaults from JOB_COMPLETION_INDEX (a Kubernetes Indexed Job)."""
    if index is None and env.get("JOB_COMPLETION_INDEX", "") != "":
        try:
            index = int(env["JOB_COMPLETION_INDEX"])
        except ValueError:
            raise UsageError(f"JOB_COMPLETION_INDEX: {env['JOB_COMPLETION_INDEX']!r} is not an "
                             f"integer") from None
    if num_shards is None:
        num_shards = 1 if index is None else None
    if num_shards is None:
        raise UsageError("--num-shards: needed with --shard-index / JOB_COMPLETION_INDEX "
                         "(set it to the Job's completions)")
    if num_shards < 1:
        raise UsageError(f"--num-shards: {num_shards} is not allowed; must be >= 1")
    index = 0 if index is None else index
    if not 0 <= index < num_shards:
        raise UsageError(f"--shard-index: {index} is not allowed; must be in [0, {num_shards - 1}]")
    return index, num_shards

