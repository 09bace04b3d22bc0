# The RunPod serverless worker: `nox -s build -- [--tag T] [--checkpoint SRC] [--cuda cu130]` (README "Deploy").
#
#   builder   uv installs the locked requirements into /opt/venv (requirements-lock-<CUDA>.txt, hashes checked)
#   converter, app   the code (model_build and core; worker, batch and handler.py), compiled to .pyc
#   runtime   the base + a C compiler (Triton builds its CUDA launcher at run time) + /opt/venv + the code;
#             with CHECKPOINT set, the converted model in /models/$MODEL_NAME
#
# Cache keys follow what each step reads. BuildKit keys a bind mount by its files, buildah (1.28) not at all: so
# everything a step's result depends on reaches it by COPY (keyed by content under every tool) or by a build
# argument (CHECKPOINT_SHA256 keys the conversion of a local checkpoint); bind mounts carry only what the step's
# keys already pin (the wheelhouse: every wheel is checked against the lock's hashes). An edit to worker/ re-runs
# the two COPY steps of the code and nothing else: no reinstall, no conversion (`nox -s image_test` checks it).
#
# The base is a slim Debian Python, not an NVIDIA CUDA image: the torch CUDA wheels carry their own CUDA libraries
# (cuBLAS, cuDNN, NCCL, ... as nvidia-* wheels) and RunPod's container runtime mounts the driver. No `# syntax=`
# line: the Dockerfile frontend built into Docker >= 23 / podman / buildah is used, nothing is pulled for it.

# By tag and digest (the multi-architecture index), so a rebuild starts from the same files.
ARG BASE_IMAGE=docker.io/library/python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

FROM ${BASE_IMAGE} AS builder
# The CUDA build of torch. cu130 (PyPI's own Linux torch: CUDA 13.0, NVIDIA driver >= 580) and cpu install
# requirements-lock-<CUDA>.txt, every file checked against its sha256. cu126 and cu128 (older drivers) take torch
# from https://download.pytorch.org/whl/<CUDA> and the rest at the cu130 lock's versions, without hashes, until
# `nox -s lock -- --build cu128` is run where that index is reachable (README "Deploy").
ARG CUDA=cu130
ARG UV_VERSION=0.13.9
# A folder of wheels in the build context for an offline build (`nox -s image_test` passes WHEELHOUSE=wheelhouse);
# the default, docker/empty, holds none: then the package indexes are used.
ARG WHEELHOUSE=docker/empty
# For tools that stamp a time into what they write (py_compile then writes hash-based .pyc files). Layer mtimes
# are the build tool's: BuildKit sets them from it with --output type=image,rewrite-timestamp=true.
ARG SOURCE_DATE_EPOCH=1764547200
ENV UV_PYTHON_DOWNLOADS=never \
    UV_LINK_MODE=copy \
    UV_CACHE_DIR=/root/.cache/uv \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH}
COPY requirements.txt requirements-lock-*.txt docker/install_requirements.sh /build/
# uv's download cache lives in a cache mount: never in a layer, reused by the next build on this machine.
RUN --mount=type=cache,target=/root/.cache/uv,sharing=locked \
    --mount=type=bind,source=${WHEELHOUSE},target=/wheelhouse \
    sh /build/install_requirements.sh /build /opt/venv "${CUDA}" "${UV_VERSION}" /wheelhouse

# The code, compiled by the base's python3 (the venv's interpreter) to .pyc files that hold the source's hash, not
# its time: the same bytes from every build. Two small stages of their own: the converter's code, then the worker's,
# so an edit of the worker leaves the converter's stage (and the conversion after it) as it was.
FROM ${BASE_IMAGE} AS converter
COPY core/ /stage/core/
COPY model_build/ /stage/model_build/
COPY docker/convert_checkpoint.sh /stage/docker/
RUN python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash /stage

FROM ${BASE_IMAGE} AS app
COPY worker/ /stage/worker/
COPY batch/ /stage/batch/
COPY handler.py test_input.json /stage/
RUN python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash /stage

FROM ${BASE_IMAGE} AS runtime
# COMPILE=unet|regional needs a C compiler at run time (Triton builds its CUDA launcher with it, against Python's
# headers, which the python image has); COMPILE=aot builds its packages' C++ wrapper with g++ (loading a built
# package needs neither). C_COMPILER=0 leaves them out; then the worker refuses COMPILE=unet|regional at start-up
# and COMPILE=aot serves only packages already on the volume.
ARG C_COMPILER=1
# Versions come from the Debian release of the base (pinned by digest) and its security updates: apt cannot pin
# them without breaking when bookworm's point releases replace a package.
# hadolint ignore=DL3008
RUN if [ "${C_COMPILER}" = 1 ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
      && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/ldconfig/aux-cache /var/log/apt /var/log/dpkg.log \
           /var/log/alternatives.log; \
    fi
# Build-time conversion. CHECKPOINT: a file in checkpoints/ of the build context (relative path; with
# CHECKPOINT_DIR=checkpoints and CHECKPOINT_SHA256, both passed by `nox -s build`: the sha256 keys the conversion's
# cache), hf://owner/repo/file@<commit>, or an https URL (then CHECKPOINT_SHA256 too); empty: no model in the image
# (network volume). REFINER_CHECKPOINT likewise bakes an SDXL refiner into /models/$REFINER_NAME (both or neither).
# Declared after the compiler's RUN: the conversion is the only RUN that follows, so only its cache depends on them.
ARG CHECKPOINT=""
ARG CHECKPOINT_SHA256=""
ARG MODEL_NAME=sdxl
ARG REFINER_CHECKPOINT=""
ARG REFINER_CHECKPOINT_SHA256=""
ARG REFINER_NAME=""
# The context folder mounted at /src/checkpoints: checkpoints/ when a local file is baked, else docker/empty (a
# folder every clone has: a bind mount of a missing folder fails the build).
ARG CHECKPOINT_DIR=docker/empty
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MODEL_NAME=${MODEL_NAME} \
    REFINER_NAME=${REFINER_NAME}
WORKDIR /app
CMD ["python", "-u", "/app/handler.py"]
# The large steps last (a builder without overlays, e.g. buildah on vfs, stores a full copy per step after them).
COPY --from=builder /opt/venv /opt/venv
# The converter first and alone, so a change to the worker's code does not convert the model again.
COPY --from=converter /stage /app
# A gated or private Hub file needs a token, given only as a build secret (--secret id=hf_token,src=FILE): it is read
# inside this one step and never lands in a layer, an ENV or the history. The script came with the converter (COPY).
RUN --mount=type=secret,id=hf_token,required=false \
    --mount=type=bind,source=${CHECKPOINT_DIR},target=/src/checkpoints \
    sh /app/docker/convert_checkpoint.sh "${CHECKPOINT}" "${CHECKPOINT_SHA256}" "/models/${MODEL_NAME}" \
    && if [ -n "${REFINER_CHECKPOINT}" ] && [ -z "${REFINER_NAME}" ]; then \
         echo "REFINER_CHECKPOINT needs REFINER_NAME (the folder under /models the worker loads)" >&2; exit 1; fi \
    && sh /app/docker/convert_checkpoint.sh "${REFINER_CHECKPOINT}" "${REFINER_CHECKPOINT_SHA256}" \
         "/models/${REFINER_NAME:-sdxl-refiner}" REFINER_CHECKPOINT
COPY --from=app /stage /app
