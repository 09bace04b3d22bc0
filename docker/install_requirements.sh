#!/bin/sh
# Install the worker's runtime packages into a fresh virtual environment with uv (the Dockerfile's builder stage).
#
#   install_requirements.sh SRC VENV CUDA UV_VERSION WHEELHOUSE
#
# SRC holds requirements.txt and the locks, requirements-lock-<build>.txt (`nox -s lock` writes them). With a lock
# for CUDA (cpu, cu130) exactly its files are installed, each checked against the lock's sha256 (uv pip sync
# --require-hashes): the same bytes on every build. Without one (cu126, cu128: their torch wheels live on
# download.pytorch.org, which the machine that made the locks could not reach) torch==X+CUDA comes from that index
# and every other package is held to the cu130 lock's version (a constraint, no hash); torch pins its own CUDA
# wheels (nvidia-*, triton) exactly. When WHEELHOUSE holds wheels, everything comes from there and nothing from
# the network. uv's download cache is the caller's cache mount; nothing else is left behind.
#
# .pyc files: compiled here with --invalidation-mode unchecked-hash, so they hold the source's hash instead of its
# modification time (which differs between builds) and are never re-checked: the image's files do not change.
set -eu
src=$1
venv=$2
cuda=$3
uv_version=$4
wheelhouse=$5

wheels=$(find "$wheelhouse" -maxdepth 1 -name '*.whl' | wc -l)
if [ "$wheels" -gt 0 ]; then
  echo "installing offline from the wheelhouse ($wheels wheels)"
  set -- --no-index --find-links "$wheelhouse"
else
  set -- --index-url https://pypi.org/simple
fi

# uv itself, pinned, in a throwaway environment (pip comes with the base's venv module).
python3 -m venv /tmp/uv-tool
/tmp/uv-tool/bin/pip install --quiet --no-cache-dir "$@" "uv==$uv_version"
uv=/tmp/uv-tool/bin/uv
"$uv" venv --quiet --python python3 "$venv"

lock="$src/requirements-lock-$cuda.txt"
if [ -f "$lock" ]; then
  echo "installing $(basename "$lock"): every file checked against its sha256"
  if [ "$1" != --no-index ] && [ "$cuda" != cu130 ]; then  # cu130's torch is PyPI's own Linux build
    set -- "$@" --extra-index-url "https://download.pytorch.org/whl/$cuda" --index-strategy unsafe-best-match
  fi
  "$uv" pip sync --python "$venv/bin/python" --require-hashes "$@" "$lock"
else
  torch_pin=$(sed -n 's/^\(torch==[^ #;]*\).*/\1/p' "$src/requirements.txt")
  if [ -z "$torch_pin" ]; then
    echo "requirements.txt pins no torch==VERSION; the CUDA build cannot be chosen" >&2
    exit 1
  fi
  # The versions of the cu130 lock for everything that is not torch or one of its CUDA wheels.
  sed -n 's/^\([A-Za-z0-9][A-Za-z0-9._-]*==[^ ;\\]*\).*/\1/p' "$src/requirements-lock-cu130.txt" \
    | grep -v -E '^(torch|triton|nvidia-[a-z0-9-]*|cuda-[a-z0-9-]*)==' >/tmp/constraints.txt
  echo "no lock for $cuda: $torch_pin+$cuda from download.pytorch.org, $(wc -l </tmp/constraints.txt) packages" \
    "held to the cu130 lock's versions (no hashes: this build is not bit-reproducible)"
  if [ "$1" != --no-index ]; then
    set -- "$@" --extra-index-url "https://download.pytorch.org/whl/$cuda" --index-strategy unsafe-best-match
  fi
  "$uv" pip install --python "$venv/bin/python" "$@" -c /tmp/constraints.txt \
    -r "$src/requirements.txt" "$torch_pin+$cuda"
fi
# The worker's cold start imports torch, diffusers and transformers: compiled once here, not on every start. A
# few files in some packages are not Python 3.11 (templates, tests); compileall names them and goes on, as uv does.
# -f: the venv's python imports _distutils_hack at start-up (setuptools' distutils-precedence.pth) and writes
# a .pyc stamped with the install time before compileall runs; without -f compileall keeps it (image_test saw
# the two builds differ there).
"$venv/bin/python" -m compileall -f -q -j 0 --invalidation-mode unchecked-hash "$venv/lib" >/tmp/compileall.log \
  || echo "compileall: $(grep -c '^\*\*\*' /tmp/compileall.log) files not compiled (not Python 3.11 source)"
rm -rf /tmp/uv-tool /tmp/constraints.txt /tmp/compileall.log
