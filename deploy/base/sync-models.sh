#!/bin/sh
# Copy the model repository into the pod's /models volume before Triton starts.
# MODEL_SOURCE is a directory on the model-source volume or an s3:// URL.
set -eu
src="${MODEL_SOURCE:?MODEL_SOURCE is not set}"
dest=/models
case "$src" in
  s3://*) aws s3 sync --only-show-errors --delete "$src" "$dest" ;;
  /*)     cp -R "$src"/. "$dest"/ ;;
  *)      echo "sync-models: MODEL_SOURCE=$src is neither s3://... nor an absolute path" >&2; exit 2 ;;
esac
n=$(find "$dest" -mindepth 2 -maxdepth 2 -name config.pbtxt | wc -l)
if [ "$n" -eq 0 ]; then
  echo "sync-models: no config.pbtxt under $dest after syncing $src" >&2
  exit 1
fi
echo "sync-models: $n models from $src"
