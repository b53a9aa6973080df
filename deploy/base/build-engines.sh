#!/bin/sh
# Build TensorRT engines on this node for every ONNX model of /models that has no plan yet.
# A plan only runs on the TensorRT version and GPU that built it, so it is built here, by the
# TensorRT inside the same Triton image that serves it. The model keeps its name: its
# config.pbtxt switches to platform tensorrt_plan, and ensembles that call it are unchanged.
# Graphs with INT64 inputs hold the seeded sampler's uint64 arithmetic, which TensorRT does not
# build: NAME_sampler stays on ONNX Runtime, and a seeded generator NAME (sampler + generator in
# one graph) becomes an ensemble NAME_sampler -> NAME_generator, so it runs the plan too.
# PRECISION: fp16 (default) or fp32. A timing cache on the node speeds up later builds.
# ONNX Runtime INT8 versions (QDQ graphs) are removed from the node's copy: TensorRT does not
# build them, and its FP16 plan of the FP32 version is the GPU's fast path.
set -eu
repo="${MODEL_REPOSITORY:-/models}"
trtexec="${TRTEXEC:-/usr/src/tensorrt/bin/trtexec}"
cache="${TIMING_CACHE:-/engine-cache/timing.cache}"
precision="${PRECISION:-fp16}"
built=0
# a seeded generator's config rewritten as an ensemble of its sampler and its generator: the
# header, inputs and outputs kept as they are, the ONNX-only fields dropped
as_ensemble() {
  awk -v n="$1" '
    /^platform:/{print "platform: \"ensemble\""; next}
    /^(backend|default_model_filename):/{next}
    /^[a-z_]+ \{/{keep = ($1 == "input" || $1 == "output")}
    /^[a-z_]+:/{print; next}
    keep{print}
    END{
      print "ensemble_scheduling {"
      print "  step {\n    model_name: \"" n "_sampler\"\n    model_version: -1"
      print "    input_map {\n      key: \"seed\"\n      value: \"seed\"\n    }"
      print "    input_map {\n      key: \"index\"\n      value: \"index\"\n    }"
      print "    output_map {\n      key: \"latent\"\n      value: \"latent\"\n    }\n  }"
      print "  step {\n    model_name: \"" n "_generator\"\n    model_version: -1"
      print "    input_map {\n      key: \"latent\"\n      value: \"latent\"\n    }"
      print "    output_map {\n      key: \"image\"\n      value: \"image\"\n    }\n  }"
      print "}"
    }' "$2"
}
for cfg in "$repo"/*/config.pbtxt; do
  dir=$(dirname "$cfg")
  name=$(basename "$dir")
  grep -q 'platform: "onnxruntime_onnx"' "$cfg" || continue
  if grep -q 'data_type: TYPE_INT64' "$cfg"; then
    if [ -f "$repo/${name}_sampler/config.pbtxt" ] && [ -f "$repo/${name}_generator/config.pbtxt" ]; then
      as_ensemble "$name" "$cfg" > "$cfg.tmp" && mv "$cfg.tmp" "$cfg"
      echo "build-engines: $name -> ensemble ${name}_sampler (ONNX Runtime) -> ${name}_generator"
    else
      echo "build-engines: $name stays on ONNX Runtime (integer sampler ops)"
    fi
    continue
  fi
  # an --any-size export (dims -1: any height and width on the model's stride) stays on ONNX
  # Runtime, whose backend checks the stride; one TensorRT profile cannot cover every window size
  if grep -q '^  dims: -1$' "$cfg"; then
    echo "build-engines: $name stays on ONNX Runtime (any height and width)"
    continue
  fi
  for onnx in "$dir"/*/model.onnx; do
    [ -f "$onnx" ] || continue
    plan="$(dirname "$onnx")/model.plan"
    [ -f "$plan" ] && continue
    # an INT8 version from `ganforge export --precision int8` is ONNX Runtime's format (QDQ with
    # uint8 activations and zero points); TensorRT builds symmetric int8 only. Left out here:
    # the FP32 version's plan serves, also the requests that name no version.
    if grep -qa QuantizeLinear "$onnx"; then
      echo "build-engines: $name version $(basename "$(dirname "$onnx")") is an ONNX Runtime INT8 graph: left out"
      rm -rf "$(dirname "$onnx")"
      continue
    fi
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
