#!/bin/sh
# Install requirements.txt into a fresh virtual environment with uv (run by the Dockerfile's builder stage).
#
#   install_requirements.sh SRC VENV CUDA UV_VERSION [WHEELHOUSE]
#
# SRC is the build context (requirements.txt), VENV the environment to create. torch comes from the PyTorch
# wheel index of CUDA (cu126, cu128, cu130 or cpu): its pin in requirements.txt is narrowed to that build's
# local version (torch==X becomes torch==X+CUDA), so the PyPI build of the same version can never win; the
# other packages come from PyPI (--index-strategy unsafe-best-match lets uv take each package from the index
# with the best match, as pip does). With WHEELHOUSE (a folder inside SRC) everything is installed offline
# from that folder instead. No package cache is left behind.
set -eu
src=$1
venv=$2
cuda=$3
uv_version=$4
wheelhouse=${5:-}

if [ -n "$wheelhouse" ]; then
  set -- --no-index --find-links "$src/$wheelhouse"
else
  set -- --extra-index-url "https://download.pytorch.org/whl/$cuda" --index-strategy unsafe-best-match
fi

# uv itself, pinned, in a throwaway environment (pip comes with the base's venv module).
python3 -m venv /tmp/uv-tool
if [ -n "$wheelhouse" ]; then
  /tmp/uv-tool/bin/pip install --no-cache-dir --no-index --find-links "$src/$wheelhouse" "uv==$uv_version"
else
  /tmp/uv-tool/bin/pip install --no-cache-dir "uv==$uv_version"
fi
uv=/tmp/uv-tool/bin/uv

torch_pin=$(sed -n 's/^\(torch==[^ #;]*\).*/\1/p' "$src/requirements.txt")
if [ -z "$torch_pin" ]; then
  echo "requirements.txt pins no torch==VERSION; the CUDA build cannot be chosen" >&2
  exit 1
fi

"$uv" venv --python python3 "$venv"
# --compile-bytecode: the worker's cold start imports torch, diffusers and transformers; compiled .pyc files
# save that time on every start instead of once per container.
"$uv" pip install --python "$venv/bin/python" --no-cache --compile-bytecode "$@" \
  -r "$src/requirements.txt" "$torch_pin+$cuda"
rm -rf /tmp/uv-tool /root/.cache
