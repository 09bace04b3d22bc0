#!/bin/sh
# Convert the checkpoint named at build time into the image (run by the Dockerfile's runtime stage).
#
#   convert_checkpoint.sh CHECKPOINT CHECKPOINT_SHA256 OUTPUT [ARGUMENT]
#
# Nothing to do when CHECKPOINT is empty (a network-volume image). A relative CHECKPOINT is a file under
# checkpoints/ of the build context, which the Dockerfile mounts at /src/checkpoints (CHECKPOINT_DIR=checkpoints).
# ARGUMENT names the build argument in messages (CHECKPOINT, or REFINER_CHECKPOINT: the converter tells a base
# from a refiner by its tensors). A Hub token is read from the build secret hf_token, exported only to the
# converter's process, and never written anywhere. The download cache is deleted in the same step, so the layer
# holds the converted folder only.
#
# The manifest records the source file's modification time (a worker recognises a checkpoint on a volume by it
# without hashing 7 GB again). In an image that time is the build machine's (a download's: the download's), so
# it is dropped: two builds of the same checkpoint write the same manifest. A baked model is found by its folder,
# a CHECKPOINT on a volume by its own manifest; neither reads this one's time.
set -eu
checkpoint=$1
sha256=$2
output=$3
argument=${4:-CHECKPOINT}

if [ -z "$checkpoint" ]; then
  echo "no $argument build argument: nothing converted into $output"
  exit 0
fi
case "$checkpoint" in
  hf://* | https://* | http://* | /*) source=$checkpoint ;;
  checkpoints/*)
    source="/src/$checkpoint"
    if [ ! -f "$source" ]; then
      echo "$argument=$checkpoint: not in the mounted checkpoints folder; build with --build-arg" \
        "CHECKPOINT_DIR=checkpoints (nox -s build passes it, and the file's sha256 as ${argument}_SHA256)" >&2
      exit 1
    fi
    ;;
  *)
    echo "$argument=$checkpoint: a local checkpoint must lie in checkpoints/ of the build context" >&2
    exit 1
    ;;
esac
if [ -s /run/secrets/hf_token ]; then
  HF_TOKEN=$(cat /run/secrets/hf_token)
  export HF_TOKEN
fi
cache=/tmp/model-download
set -- --output "$output" --cache-dir "$cache"
if [ -n "$sha256" ]; then
  set -- "$@" --sha256 "$sha256"
fi
drop_mtime='
import json, sys
path = sys.argv[1]
with open(path) as handle:
    manifest = json.load(handle)
for record in (manifest.get("source"), manifest.get("vae")):
    if record:
        record.pop("mtime_ns", None)
with open(path, "w") as handle:  # as model_build.manifest.Manifest.to_json writes it
    handle.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
'
status=0
python -m model_build convert "$source" "$@" \
  && python -c "$drop_mtime" "$output/manifest.json" \
  && python -m model_build verify "$output" --full || status=$?
rm -rf "$cache" /root/.cache
exit "$status"
