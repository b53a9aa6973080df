"""`ganforge bench batch-inpaint`: a batch inpainting job through the local Triton server vs the
same ONNX model run in-process with ONNX Runtime, on the same items, side by side in one run.

    ganforge bench batch-inpaint [--items N] [--model NAME] [--repository DIR]
                                 [--concurrency N] [--rounds R] [--json PATH] [--quick]

Both sides run the whole job pipeline of serving/jobs/ (decode, check, crop, resize, paste
back, PNG encode, atomic write, journal) on the same photos and masks; only who answers a batch
differs: Triton over asynchronous gRPC, or an ONNX Runtime session in this process. After an
untimed warm-up of both sides on 64 items, rounds are paired (in-process then served, then
served then in-process, ...) so both sides of a round see the same machine load; the ratio
reported is the median of the rounds' ratios. Where the server shares the CPU cores with the
job's own decoding and encoding, the served side pays for both; the in-process side runs the
model on the same cores without gRPC.

The model: `--model` (default: the trained `fill_thinplate` when it is there) from
`--repository` (default: the committed model_repository/) when it is there, otherwise the
untrained fill inpainter (export/fill_inpainter.py) at tile 64, with `--convs N` random 3x3
convolutions for the compute of a small learned model. The outputs of the two sides are
compared byte for byte too.

JSON keys: `items`, `served_items_per_s` / `inprocess_items_per_s` (per round),
`round_ratios` (served / in-process per round), `ratio` (their median), `outputs_identical`,
`model`, `tile`, `settings`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def make_items(dest: Path, n: int, seed: int = 0) -> None:
    """n photos of mixed sizes (crops of scikit-image's bundled photos, JPEG and PNG) with a
    mask each (one to three rectangles, 3-25 % of the picture) named photo_mask.png."""
    from PIL import Image
    from skimage import data

    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = sources[i % len(sources)]
        h = int(rng.integers(48, min(320, src.shape[0] - 1)))
        w = int(rng.integers(48, min(320, src.shape[1] - 1)))
        y, x = int(rng.integers(0, src.shape[0] - h)), int(rng.integers(0, src.shape[1] - w))
        img = np.ascontiguousarray(src[y:y + h, x:x + w, :3])
        mask = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            mh, mw = int(rng.integers(h // 8, h // 3)), int(rng.integers(w // 8, w // 3))
            my, mx = int(rng.integers(0, h - mh)), int(rng.integers(0, w - mw))
            mask[my:my + mh, mx:mx + mw] = 255
        name = f"photo{i:05d}"
        if i % 2:
            Image.fromarray(img).save(dest / f"{name}.jpg", quality=92)
        else:
            Image.fromarray(img).save(dest / f"{name}.png")
        Image.fromarray(mask).save(dest / f"{name}_mask.png")


def model_repository(repository: Path, model: str, dest: Path, convs: int = 0) -> tuple[Path, Path]:
    """A repository holding only `model` (copied from `repository`, or the fill inpainter
    exported there when `repository` has no such model); returns (repo, onnx path)."""
    src = repository / model
    if src.is_dir() and (src / "1" / "model.onnx").is_file():
        shutil.copytree(src, dest / model)
        return dest, dest / model / "1" / "model.onnx"
    from ganforge.export.fill_inpainter import export_fill_inpainter

    return dest, export_fill_inpainter(dest, model, tile=64, max_batch_size=32, convs=convs)


def run(argv: list[str]) -> int:
    from ganforge.serving import jobs
    from ganforge.serving.server import LocalServer, ServerOptions, free_port

    p = argparse.ArgumentParser(prog="ganforge bench batch-inpaint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=None, help="photos per round (default 400, quick 120)")
    p.add_argument("--model", default=None,
                   help="default: fill_thinplate when --repository has it, else fill_inpainter")
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=None, help="rounds per side (default 5, quick 2)")
    p.add_argument("--convs", type=int, default=0,
                   help="fill inpainter only: add N 3x3 convolutions of 32 channels (seeded random "
                        "weights), the compute of a small learned model")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    n = a.items or (120 if a.quick else 400)
    if a.model is None:
        a.model = ("fill_thinplate" if (a.repository / "fill_thinplate" / "1" / "model.onnx").is_file()
                   else "fill_inpainter")
    rounds = a.rounds or (2 if a.quick else 5)

    with tempfile.TemporaryDirectory(prefix="ganforge-bench-jobs-") as tmp:
        tmp = Path(tmp)
        make_items(tmp / "photos", n)
        items, bad = jobs.discover(tmp / "photos", tmp / "out")
        assert not bad, bad
        repo, onnx_path = model_repository(a.repository, a.model, tmp / "repo", a.convs)
        opts = ServerOptions(model_repository=repo, grpc_port=free_port(), http_port=free_port(),
                             metrics_port=free_port(), exit_timeout_s=2)
        from ganforge.serving.repository import read_config
        max_batch = read_config(repo / a.model / "config.pbtxt").max_batch_size
        served, local, outs = [], [], {}
        with LocalServer(opts) as server:
            job_opts = jobs.JobOptions(url=server.grpc_url, model=a.model,
                                       concurrency=a.concurrency, progress=False)
            # Warm-up, not timed: the page cache, Pillow's codecs, both sessions' first batches.
            for side in ("inprocess", "served"):
                warm, _ = jobs.discover(tmp / "photos", tmp / f"warm-{side}")
                engine = jobs.OnnxEngine(onnx_path, max_batch) if side == "inprocess" else None
                jobs.Job(warm[:64], tmp / f"warm-{side}", job_opts, engine=engine).run()
            for r in range(rounds):
                for side in (("inprocess", "served") if r % 2 == 0 else ("served", "inprocess")):
                    out = tmp / f"out-{side}-{r}"
                    items_r, _ = jobs.discover(tmp / "photos", out)
                    engine = jobs.OnnxEngine(onnx_path, max_batch) if side == "inprocess" else None
                    s = jobs.Job(items_r, out, job_opts, engine=engine).run()
                    assert s.done == n and s.failed == 0, s
                    (local if side == "inprocess" else served).append(s.items_per_s)
                    outs[side] = out
                    print(f"round {r + 1}/{rounds} {side:>9}: {s.items_per_s:7.1f} img/s "
                          f"({s.batches} batches, {s.time_s:.2f} s)", flush=True)
            tile = jobs.OnnxEngine(onnx_path).tile

        def files(d):
            return {q.relative_to(d).as_posix(): q.read_bytes() for q in sorted(d.rglob("*.png"))}
        identical = files(outs["served"]) == files(outs["inprocess"])
        # Paired rounds ran back to back under the same machine load: the median of their
        # ratios is steadier than a ratio of medians on a shared machine.
        ratios = [sv / lc for sv, lc in zip(served, local)]
        ratio = statistics.median(ratios)
    result = {"items": n, "rounds": rounds, "model": a.model, "tile": tile, "convs": a.convs,
              "served_items_per_s": served, "inprocess_items_per_s": local,
              "round_ratios": [round(x, 3) for x in ratios],
              "ratio": round(ratio, 3), "outputs_identical": identical,
              "settings": {"concurrency": a.concurrency, "batch": "model max_batch_size",
                           "workers": "CPU count"}}
    print(f"batch-inpaint, {n} photos, model {a.model} (tile {tile}): served "
          f"{statistics.median(served):.1f} img/s vs in-process ONNX Runtime "
          f"{statistics.median(local):.1f} img/s (medians); median of round ratios {ratio:.2f} "
          f"(goal >= 0.8); outputs "
          f"{'byte-identical' if identical else 'DIFFER'}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
