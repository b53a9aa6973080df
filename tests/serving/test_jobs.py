"""Batch inpainting jobs against a real tritonserver serving a real ONNX inpainting model (the
untrained fill inpainter of export/fill_inpainter.py, a test model), on real files: broken
items are recorded and the job goes on, a SIGKILLed server is waited for and the outputs are
byte-identical to an uninterrupted run's, --resume does only what is missing, shards partition
the items exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ganforge.masks import read_mask
from ganforge.serving import jobs
from ganforge.serving.server import LocalServer, ServerOptions, free_port
from tests.conftest import run_cli

pytestmark = pytest.mark.slow
MODEL = "fill_inpainter"
TILE = 32


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth colour picture with some texture, (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + seed), np.cos(5 * yy - seed), np.sin(4 * (xx + yy))], -1)
    img = 127 + 100 * base + rng.normal(0, 8, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def hole(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    m = np.zeros((h, w), np.uint8)
    y, x = rng.integers(0, h - h // 4), rng.integers(0, w - w // 4)
    m[y:y + max(h // 4, 2), x:x + max(w // 5, 2)] = 255
    return m


SIZES = [(24, 40), (32, 32), (48, 64), (100, 150), (200, 120), (77, 51)]


def make_folder(root: Path, n: int, broken: bool = False) -> tuple[list[str], list[str]]:
    """n good items of mixed sizes and formats (nested folders); with `broken`, five bad ones.
    Returns (good keys, bad keys)."""
    good = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        sub = root / ("a" if i % 3 == 0 else "b/c" if i % 3 == 1 else "")
        sub.mkdir(parents=True, exist_ok=True)
        img = photo(h, w, i)
        kind = i % 5
        if kind == 0:
            Image.fromarray(img).save(sub / f"p{i}.jpg", quality=90)
        elif kind == 1:
            Image.fromarray(img).save(sub / f"p{i}.png")
        elif kind == 2:
            Image.fromarray(img[..., 0]).save(sub / f"p{i}.png")             # greyscale
        elif kind == 3:
            rgba = np.concatenate([img, np.full((h, w, 1), 200, np.uint8)], -1)
            Image.fromarray(rgba).save(sub / f"p{i}.png")                    # RGBA
        else:
            Image.fromarray(img).save(sub / f"p{i}.bmp")
        Image.fromarray(hole(h, w, i)).save(sub / f"p{i}_mask.png")
        good.append((sub / f"p{i}.png").relative_to(root).as_posix())
    bad = []
    if broken:
        (root / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        Image.fromarray(hole(10, 10, 0)).save(root / "truncated_mask.png")
        Image.fromarray(photo(40, 40, 1)).save(root / "wrongsize.png")
        Image.fromarray(hole(30, 40, 1)).save(root / "wrongsize_mask.png")
        Image.fromarray(photo(40, 40, 2)).save(root / "nohole.png")
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / "nohole_mask.png")
        Image.fromarray(photo(40, 40, 3)).save(root / "nomask.png")
        (root / "notanimage.png").write_text("hello")
        Image.fromarray(hole(10, 10, 0)).save(root / "notanimage_mask.png")
        bad = ["truncated.png", "wrongsize.png", "nohole.png", "nomask.png", "notanimage.png"]
    return good, bad


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    from ganforge.export.fill_inpainter import export_fill_inpainter

    r = tmp_path_factory.mktemp("jobs-repo") / "model_repository"
    export_fill_inpainter(r, MODEL, tile=TILE, max_batch_size=8, intra_op_threads=1)
    return r


def start_server(repo: Path, ports: tuple[int, int, int] | None = None) -> LocalServer:
    g, h, m = ports or (free_port(), free_port(), free_port())
    return LocalServer(ServerOptions(model_repository=repo, grpc_port=g, http_port=h,
                                     metrics_port=m, exit_timeout_s=2)).start()


@pytest.fixture(scope="module")
def server(repo):
    srv = start_server(repo)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    good, bad = make_folder(root, 36, broken=True)
    return root, good, bad


@pytest.fixture(scope="module")
def reference(server, folder, tmp_path_factory):
    """One uninterrupted run over the folder, through the CLI."""
    root, _, _ = folder
    out = tmp_path_factory.mktemp("reference")
    r = run_cli("batch-inpaint", str(root), "-o", str(out), "--url", server.grpc_url,
                "--model", MODEL, "-q")
    return out, r


def outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def test_a_folder_with_broken_items_does_every_good_one_and_records_every_bad_one(folder, reference):
    root, good, bad = folder
    out, r = reference
    assert r.returncode == 3, r.stdout + r.stderr
    assert sorted(outputs(out)) == sorted(good)
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["key"] for f in failures) == sorted(bad)
    reasons = {f["key"]: f["reason"] for f in failures}
    assert "not a readable image" in reasons["truncated.png"]
    assert "mask size mismatch" in reasons["wrongsize.png"]
    assert "empty mask" in reasons["nohole.png"]
    assert "no mask found" in reasons["nomask.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["done"], summary["failed"], summary["skipped"]) == (len(good), len(bad), 0)
    assert r.stdout.splitlines()[0].startswith(f"batch-inpaint: {len(good)} done, 0 skipped, "
                                               f"{len(bad)} failed of {len(good) + len(bad)}")
    assert not [p for p in out.rglob("*") if ".partial-" in p.name]


def test_pixels_outside_the_holes_are_byte_identical_and_the_holes_are_filled(folder, reference):
    root, good, _ = folder
    out, _ = reference
    for key in good:
        src = next(p for p in (root / key).parent.glob(Path(key).stem + ".*")
                   if not p.stem.endswith("_mask"))
        from ganforge.images import read_image
        image = read_image(src)
        mask = read_mask((root / key).parent / f"{Path(key).stem}_mask.png") > 0
        result = np.asarray(Image.open(out / key))
        assert result.shape == image.shape
        assert np.array_equal(result[~mask], image[~mask]), key
        assert not np.array_equal(result[mask], image[mask]), key


def test_a_server_killed_mid_job_is_waited_for_and_the_outputs_match_an_uninterrupted_run(
        repo, folder, reference, tmp_path):
    root, good, _ = folder
    ref_out, _ = reference
    srv = start_server(repo)
    ports = (srv.options.grpc_port, srv.options.http_port, srv.options.metrics_port)
    out = tmp_path / "out"
    # Small batches, one request in flight: the job lasts long enough to be hit mid-way.
    cmd = [sys.executable, "-m", "ganforge", "batch-inpaint", str(root), "-o", str(out),
           "--url", srv.grpc_url, "--model", MODEL, "--concurrency", "1", "--batch-size", "1",
           "--wait-for-server", "120", "-q"]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        journal = out / "journal.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if journal.is_file() and len(journal.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        srv.proc.send_signal(signal.SIGKILL)
        srv.stop()
        done_before = len(journal.read_text().splitlines())
        time.sleep(1.0)
        srv = start_server(repo, ports)
        stdout, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
        srv.stop()
    assert job.returncode == 3, stdout + stderr
    assert done_before < len(good), "the job ended before the server was killed"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["server_waits"] >= 1 and summary["done"] == len(good)
    assert outputs(out) == outputs(ref_out)


def test_resume_after_an_interrupted_run_does_only_the_missing_items(server, tmp_path):
    root = tmp_path / "in"
    good, _ = make_folder(root, 60)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ganforge", "batch-inpaint", str(root), "-o", str(out),
           "--url", server.grpc_url, "--model", MODEL, "--concurrency", "1", "--batch-size", "1", "-q"]
    # started as a background shell starts it, with SIGINT ignored: SIGTERM must still stop it
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    journal = out / "journal.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (journal.is_file() and len(journal.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # as Kubernetes stops a pod; Ctrl-C takes the same path
    stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == 130, stderr
    assert stdout.splitlines()[-1] == "stopped: interrupted (Ctrl-C or SIGTERM); rerun with --resume"
    assert not [p for p in out.rglob("*") if ".partial-" in p.name]
    first = json.loads((out / "summary.json").read_text())
    assert first["status"] == "interrupted" and 0 < first["done"] < len(good)
    # Damage one recorded output: resume must redo it rather than trust the journal.
    recorded = [json.loads(line)["key"] for line in journal.read_text().splitlines()]
    (out / recorded[0]).write_bytes(b"damaged")
    before = {k: os.stat(out / k).st_mtime_ns for k in recorded[1:]}

    r = run_cli("batch-inpaint", str(root), "-o", str(out), "--url", server.grpc_url,
                "--model", MODEL, "--resume", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    second = json.loads((out / "summary.json").read_text())
    assert second["skipped"] == len(recorded) - 1
    assert second["done"] == len(good) - len(recorded) + 1
    assert {k: os.stat(out / k).st_mtime_ns for k in recorded[1:]} == before
    assert sorted(outputs(out)) == sorted(good)
    Image.open(out / recorded[0]).verify()


def test_shards_partition_the_items_exactly(server, folder, reference, tmp_path):
    root, good, bad = folder
    ref_out, _ = reference
    out = tmp_path / "out"
    seen = []
    for i in range(3):
        env_index = {"JOB_COMPLETION_INDEX": str(i)}
        r = subprocess.run([sys.executable, "-m", "ganforge", "batch-inpaint", str(root), "-o",
                            str(out), "--url", server.grpc_url,    # the default model
                            "--num-shards", "3", "-q"], capture_output=True, text=True,
                           env={**os.environ, **env_index}, timeout=120)
        assert r.returncode in (0, 3), r.stderr
        s = json.loads((out / f"summary.shard-{i}-of-3.json").read_text())
        keys = [json.loads(line)["key"] for line in
                (out / f"journal.shard-{i}-of-3.jsonl").read_text().splitlines()]
        keys += [json.loads(line)["key"] for line in
                 (out / f"failures.shard-{i}-of-3.jsonl").read_text().splitlines()]
        assert len(keys) == s["total"] and s["model"] == MODEL
        seen += keys
    assert sorted(seen) == sorted(good + bad)          # none twice, none missing
    assert outputs(out) == outputs(ref_out)

    # A re-run of shard 1 redoes only its own missing item; an unsharded resume skips them all.
    mine = [json.loads(line)["key"] for line in (out / "journal.shard-1-of-3.jsonl").read_text().splitlines()]
    (out / mine[0]).unlink()
    r = run_cli("batch-inpaint", str(root), "-o", str(out), "--url", server.grpc_url, "--resume",
                "--shard-index", "1", "--num-shards", "3", "-q")
    s = json.loads((out / "summary.shard-1-of-3.json").read_text())
    assert (s["done"], s["skipped"]) == (1, len(mine) - 1), r.stdout + r.stderr
    r = run_cli("batch-inpaint", str(root), "-o", str(out), "--url", server.grpc_url, "--resume", "-q")
    s = json.loads((out / "summary.json").read_text())
    assert (s["done"], s["skipped"], s["failed"]) == (0, len(good), len(bad)), r.stdout + r.stderr


def test_masks_can_live_in_a_separate_folder(server, tmp_path):
    (tmp_path / "img" / "sub").mkdir(parents=True)
    (tmp_path / "masks" / "sub").mkdir(parents=True)
    Image.fromarray(photo(40, 60, 1)).save(tmp_path / "img" / "sub" / "a.jpg")
    Image.fromarray(hole(40, 60, 1)).save(tmp_path / "masks" / "sub" / "a.png")       # same name
    Image.fromarray(photo(50, 30, 2)).save(tmp_path / "img" / "b.png")
    Image.fromarray(hole(50, 30, 2)).save(tmp_path / "masks" / "b_mask.png")          # _mask name
    r = run_cli("batch-inpaint", str(tmp_path / "img"), "-o", str(tmp_path / "out"), "--masks",
                str(tmp_path / "masks"), "--url", server.grpc_url, "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(outputs(tmp_path / "out")) == ["b.png", "sub/a.png"]


def test_shard_split_is_stable_and_balanced():
    keys = [f"dir{i % 7}/photo{i}.png" for i in range(3000)]
    parts = [jobs.shard(keys, i, 4, key=lambda k: k) for i in range(4)]
    assert sorted(sum(parts, [])) == sorted(keys)
    assert all(600 < len(p) < 900 for p in parts)
    assert [jobs.shard_of(k, 5) for k in ("x.png", "y/z.png")] == [
        int.from_bytes(__import__("hashlib").sha256(k.encode()).digest()[:8], "big") % 5
        for k in ("x.png", "y/z.png")]


def test_a_manifest_names_images_masks_and_outputs(server, tmp_path):
    Image.fromarray(photo(50, 70, 5)).save(tmp_path / "one.jpg")
    Image.fromarray(hole(50, 70, 5)).save(tmp_path / "one_m.png")
    lines = [json.dumps({"image": "one.jpg", "mask": "one_m.png", "output": "x/first.png"}),
             "{not json", json.dumps({"image": "one.jpg", "mask": "one_m.png", "output": "../escape.png"})]
    (tmp_path / "job.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    r = run_cli("batch-inpaint", str(tmp_path / "job.jsonl"), "-o", str(out), "--url",
                server.grpc_url, "--model", MODEL, "--dilate", "2")
    assert r.returncode == 3, r.stdout + r.stderr
    progress = r.stderr.splitlines()[-1]
    assert progress.startswith("batch-inpaint [") and " 3/3 100.0% " in progress
    assert " img/s " in progress and " eta " in progress and "failed 2" in progress
    assert (out / "x" / "first.png").is_file()
    reasons = [json.loads(line)["reason"] for line in (out / "failures.jsonl").read_text().splitlines()]
    assert any("job.jsonl:2: not a manifest line" in x for x in reasons)
    assert any("must be a relative path" in x for x in reasons)


def test_usage_errors_exit_2_and_an_absent_server_exits_1(tmp_path):
    r = run_cli("batch-inpaint", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.startswith("Error: INPUT:")
    r = run_cli("batch-inpaint", str(tmp_path), "-o", str(tmp_path / "o"), "--shard-index", "3",
                "--num-shards", "2")
    assert r.returncode == 2 and "--shard-index: 3 is not allowed" in r.stderr
    make_folder(tmp_path / "in", 2)
    r = run_cli("batch-inpaint", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--url",
                f"localhost:{free_port()}", "--wait-for-server", "1", "-q")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "unavailable for more than 1 s" in r.stdout + r.stderr


def test_each_output_is_what_client_inpaint_gives_for_that_photo(server, folder, reference):
    """The job runs the client's own crop-around-the-holes path, batched across items."""
    from ganforge.images import read_image
    from ganforge.serving.client import Client

    root, good, _ = folder
    out, _ = reference
    with Client(server.grpc_url, timeout=30) as c:
        for key in good[:8]:                      # every size and format of the folder
            folder_ = (root / key).parent
            src = next(p for p in folder_.glob(Path(key).stem + ".*") if not p.stem.endswith("_mask"))
            mask = np.asarray(Image.open(folder_ / f"{Path(key).stem}_mask.png"))
            expected = c.inpaint(MODEL, read_image(src), mask)
            assert np.array_equal(np.asarray(Image.open(out / key)), expected), key


def test_a_memory_budget_smaller_than_one_photo_still_finishes_the_job(server, tmp_path):
    good, _ = make_folder(tmp_path / "in", 8)
    items, bad = jobs.discover(tmp_path / "in", tmp_path / "out")
    opts = jobs.JobOptions(url=server.grpc_url, model=MODEL, memory_bytes=1, progress=False)
    s = jobs.run_job(items, tmp_path / "out", opts, failures=bad)
    assert (s.done, s.failed, jobs.exit_code(s)) == (len(good), 0, 0)


def test_timeouts_are_retried_then_recorded_as_failures(server, tmp_path):
    make_folder(tmp_path / "in", 2)
    r = run_cli("batch-inpaint", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--url",
                server.grpc_url, "--timeout", "0.0001", "--retries", "1", "-q")
    assert r.returncode == 3, r.stdout + r.stderr
    failures = [json.loads(x) for x in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 2
    assert all("server error after 1 retries" in f["reason"] and "timed out" in f["reason"]
               for f in failures)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["retries"] >= 1


def test_batch_inpaint_runs_without_torch(server, tmp_path):
    make_folder(tmp_path / "in", 3)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from ganforge.cli import main\n"
            f"rc = main(['batch-inpaint', r'{tmp_path / 'in'}', '-o', r'{tmp_path / 'out'}',"
            f" '--url', '{server.grpc_url}', '-q'])\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
            "sys.exit(rc)\n")
    # three small images take seconds; the limit only stops a hang (a loaded 2-core host once
    # took over two minutes to start the interpreter, import and finish)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(outputs(tmp_path / "out")) == 3
