"""Batch inpainting jobs: folders and manifests of photos with masks, sent through a Triton
inpainting model as fast as the server allows, resumable, and nothing lost when a server dies.

    >>> from ganforge.serving.jobs import JobOptions, discover, run_job
    >>> items, bad = discover("photos/", "out/")
    >>> summary = run_job(items, "out/", JobOptions(url="localhost:8001", model="fill_inpainter"),
    ...                   failures=bad)

The pipeline: each item in flight has a thread (at most 2 x batch x concurrency of them) that

    reads image + mask, sha256 both, validates, dilates,
    runs serving.inpaint.inpaint_image (the path of Client.inpaint: windows around the holes,
    resized to the model's tile or, for an --any-size model, at native size; pasted back
    into the holes only) with a `run` that hands the tiles to the event loop and waits,   ─┐
    encodes PNG, writes it to a temporary name and renames it into place.                  │
    event loop: packs the tiles of many items into batches of one shape, keeps up to  ◄───┘
    `concurrency` asynchronous gRPC requests in flight, retries, waits for a restarted
    server, records each written output in the journal.

Files in OUTPUT_DIR (with `.shard-I-of-N` before the suffix when the job is sharded):
`journal.jsonl` (one line per written output: sha256 of image, mask and output, model, tile,
dilation), `failures.jsonl` (this run's failed items with the reason), `summary.json`.

Resume: an item is skipped when its journal line (in any `journal*.jsonl` of OUTPUT_DIR, so a
job sharded differently resumes too) exists, its output file's sha256 equals the
recorded one, and the image's and mask's sha256, the model, the tile size and the dilation are
the same as now. Anything else is done again. Outputs are renamed into place before their
journal line is written, so a crash between the two only costs redoing that item.

Exit codes (`exit_code(summary)`): 0 every item done or skipped, 3 some items failed (see
failures.jsonl), 1 the job stopped (server gone longer than `wait_for_server_s`), 130 Ctrl-C.

The modules: `discovery` (items, manifests, shards), `items` (read, check and write one item),
`engines` (who answers a batch: Triton, or ONNX Runtime in process for the benchmark), `runner`
(options, the event loop, journal, summary, exit codes).
Nothing here imports torch.
"""

from ganforge.serving.jobs.discovery import (MASK_SUFFIX, Item, discover, shard, shard_defaults,
                                             shard_of)
from ganforge.serving.jobs.engines import OnnxEngine, TritonEngine
from ganforge.serving.jobs.items import Failed, Prepared, Skipped, finish, prepare, write_atomic
from ganforge.serving.jobs.runner import (DEFAULT_MODEL, EXIT_INTERRUPTED, EXIT_OK, EXIT_RUNTIME,
                                          EXIT_SOME_FAILED, EXIT_USAGE, ItemFailed, Job, JobAborted,
                                          JobOptions, JobStopped, Summary, exit_code, job_file,
                                          read_journal, run_job, summary_lines)

__all__ = [
    "DEFAULT_MODEL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_RUNTIME", "EXIT_SOME_FAILED", "EXIT_USAGE",
    "MASK_SUFFIX", "Failed", "Item", "ItemFailed", "Job", "JobAborted", "JobOptions", "JobStopped",
    "OnnxEngine", "Prepared", "Skipped", "Summary", "TritonEngine", "discover", "exit_code",
    "finish", "job_file", "prepare", "read_journal", "run_job", "shard", "shard_defaults",
    "shard_of", "summary_lines", "write_atomic",
]
