#!/usr/bin/env bash
# Run one nox session on an offline GPU machine from a fresh clone of main, the way issue 12's results were made.
#
#   bash bench/gpu_fresh_clone.sh SESSION [ARGS...]      e.g.  bash bench/gpu_fresh_clone.sh smoke --steps 20
#
# From the root of a checkout that carries (git-ignored) .whl/ (the wheels the machine lacks: diffusers,
# transformers, peft, pydantic, torchsde, nox and their needs; bench/results/README.md lists them) and
# .fresh/main.bundle (`git bundle create .fresh/main.bundle main`). It installs the wheels into /tmp/site,
# makes `python` the machine's torch interpreter, clones the bundle into /tmp/fresh and runs
# `nox --no-venv -R -s SESSION -- ARGS` there (no venv, nothing installed: the machine cannot download).
# Everything printed is also kept in $OUT/SESSION.log (default OUT: /tmp/out).
set -uo pipefail
session=${1:?usage: bash bench/gpu_fresh_clone.sh SESSION [ARGS...]}
shift
root=$PWD
out=${OUT:-/tmp/out}
mkdir -p "$out"
# pip compiles the wheels to bytecode here, as the image's `pip install` does: without .pyc files (and with
# PYTHONDONTWRITEBYTECODE set) every fresh process compiles diffusers and transformers again, which a cold-start
# measurement would count as import time.
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site \
  "$root"/.whl/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# A wrapper script, not a symlink: a venv's python linked from elsewhere loses its venv (no pyvenv.cfg beside
# the link). Remove what an earlier call left first: writing into a leftover link would overwrite python3.
interpreter=$(command -v python3)
rm -f /tmp/bin/python
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$interpreter" >/tmp/bin/python && chmod +x /tmp/bin/python
export PATH=/tmp/bin:/tmp/site/bin:$PATH
rm -rf /tmp/fresh
git clone -q -b main "$root/.fresh/main.bundle" /tmp/fresh || exit 1
cd /tmp/fresh || exit 1
echo "fresh clone at $(git log --oneline -1 | cut -c1-72); $(python -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)')"
python3 -m nox --no-venv -R -s "$session" -- "$@" 2>&1 | tee "$out/$session.log"
