#!/usr/bin/env bash
# perf_analyzer, Triton's C++ load generator, into VENV/perf_analyzer/bin (used by
# `ganforge bench serve` to drive the server without a Python client's CPU cost; see
# docs/performance.md). From the package registry, pinned:
#   - the binary from tritonclient 2.34.0, the last tritonclient wheel that ships it;
#   - libcudart.so.12 from NVIDIA's CUDA runtime wheel: the binary links it, no GPU is needed;
#   - libb64 from the nvidia-pytriton wheel the venv already holds.
# Linux x86-64 only (the wheel's platform); elsewhere it says so and the benchmark measures
# with the Python client alone.
set -euo pipefail
VENV=${1:-.venv}
DEST="$VENV/perf_analyzer"
if [ -x "$DEST/bin/perf_analyzer" ]; then exit 0; fi
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  echo "perf_analyzer: no build for $(uname -s)-$(uname -m); bench serve will use the Python client only"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$VENV/bin/python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" \
  "tritonclient==2.34.0" "nvidia-cuda-runtime-cu12==12.9.79"
mkdir -p "$DEST/bin" "$DEST/lib" "$DEST/libexec"
"$VENV/bin/python" - "$tmp" "$DEST" <<'PY'
import glob, os, sys, zipfile
from pathlib import Path

import pytriton

tmp, dest = Path(sys.argv[1]), Path(sys.argv[2])
wanted = {"tritonclient-2.34.0.data/data/bin/perf_analyzer": dest / "libexec" / "perf_analyzer",
          "nvidia/cuda_runtime/lib/libcudart.so.12": dest / "lib" / "libcudart.so.12"}
for wheel in tmp.glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for name in set(z.namelist()) & set(wanted):
            wanted.pop(name).write_bytes(z.read(name))
if wanted:
    raise SystemExit(f"perf_analyzer: {', '.join(wanted)} not found in the downloaded wheels")
os.chmod(dest / "libexec" / "perf_analyzer", 0o755)
libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
b64 = sorted(glob.glob(str(libs / "libb64*.so*")))
if not b64:
    raise SystemExit(f"perf_analyzer: libb64 not found in {libs}")
link = dest / "lib" / "libb64.so.0d"
link.unlink(missing_ok=True)
link.symlink_to(b64[0])
PY
cat > "$DEST/bin/perf_analyzer" <<'SH'
#!/bin/sh
here=$(cd "$(dirname "$0")/.." && pwd)
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/libexec/perf_analyzer" "$@"
SH
chmod +x "$DEST/bin/perf_analyzer"
usage=$("$DEST/bin/perf_analyzer" -h 2>&1 || true)   # -h prints the usage and exits 1
case "$usage" in
  *service-kind*) ;;
  *) echo "perf_analyzer: installed in $DEST but does not start: ${usage:0:300}"; exit 1 ;;
esac
echo "perf_analyzer: installed in $DEST"
