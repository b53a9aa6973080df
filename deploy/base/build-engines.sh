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
    # the first input block of the rendered config: its name and dims (batch is implicit)
    input=$(awk '/^input \{/{f=1} f&&/name:/{gsub(/"/,"",$2); print $2; exit}' "$cfg")
    dims=$(awk '/^input \{/{f=1} f&&/dims:/{printf "x%s",$2} f&&/^\}/{exit}' "$cfg")
    mbs=$(awk '/^max_batch_size:/{print $2}' "$cfg")
    opt=$(( (mbs + 1) / 2 ))
    flag=""
    [ "$precision" = fp16 ] && flag="--fp16"
    echo "build-engines: $onnx -> $plan ($input 1..$mbs$dims, $precision)"
    "$trtexec" --onnx="$onnx" --saveEngine="$plan" $flag \
      --minShapes="$input:1$dims" --optShapes="$input:$opt$dims" --maxShapes="$input:$mbs$dims" \
      --timingCacheFile="$cache" --skipInference >"$plan.log" 2>&1 \
      || { tail -20 "$plan.log" >&2; exit 1; }
    sed -i -e 's/^platform: "onnxruntime_onnx"/platform: "tensorrt_plan"/' \
           -e 's/^backend: "onnxruntime"/backend: "tensorrt"/' \
           -e 's/^default_model_filename: "model.onnx"/default_model_filename: "model.plan"/' "$cfg"
    built=$((built + 1))
  done
done
echo "build-engines: built $built engines"
