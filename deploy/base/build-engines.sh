#!/bin/sh
# Build TensorRT engines on this node for every ONNX model of /models that has no plan yet.
# A plan only runs on the TensorRT version and GPU that built it, so it is built here, by the
# TensorRT inside the same Triton image that serves it. The model keeps its name: its
# config.pbtxt switches to platform tensorrt_plan, and ensembles that call it are unchanged.
# PRECISION: fp16 (default) or fp32. A timing cache on the node speeds up later builds.
set -eu
repo="${MODEL_REPOSITORY:-/models}"
trtexec="${TRTEXEC:-/usr/src/tensorrt/bin/trtexec}"
cache="${TIMING_CACHE:-/engine-cache/timing.cache}"
precision="${PRECISION:-fp16}"
built=0
for cfg in "$repo"/*/config.pbtxt; do
  dir=$(dirname "$cfg")
  grep -q 'platform: "onnxruntime_onnx"' "$cfg" || continue
  for onnx in "$dir"/*/model.onnx; do
    [ -f "$onnx" ] || continue
    plan="$(dirname "$onnx")/model.plan"
    [ -f "$plan" ] && continue
    # every input of the rendered config, batch first: name:BxD1xD2,...
    mbs=$(awk '/^max_batch_size:/{print $2}' "$cfg")
    opt=$(( (mbs + 1) / 2 ))
    shapes() {
      awk -v b="$1" '/^input \{/{f=1; n=""; d=""; next}
        f && /^  name:/{gsub(/"/, "", $2); n=$2}
        f && /^  dims:/{d=d "x" $2}
        f && /^\}/{s=s sep n ":" b d; sep=","; f=0}
        END{print s}' "$cfg"
    }
    log="${TMPDIR:-/tmp}/$(basename "$dir").trtexec.log"
    flag=""
    [ "$precision" = fp16 ] && flag="--fp16"
    echo "build-engines: $onnx -> $plan ($(shapes 1) .. $(shapes "$mbs"), $precision)"
    "$trtexec" --onnx="$onnx" --saveEngine="$plan" $flag \
      --minShapes="$(shapes 1)" --optShapes="$(shapes "$opt")" --maxShapes="$(shapes "$mbs")" \
      --timingCacheFile="$cache" --skipInference >"$log" 2>&1 \
      || { tail -20 "$log" >&2; exit 1; }
    sed -i -e 's/^platform: "onnxruntime_onnx"/platform: "tensorrt_plan"/' \
           -e 's/^backend: "onnxruntime"/backend: "tensorrt"/' \
           -e 's/^default_model_filename: "model.onnx"/default_model_filename: "model.plan"/' "$cfg"
    built=$((built + 1))
  done
done
echo "build-engines: built $built engines"
