# syntax=docker/dockerfile:1
# The RunPod serverless worker: `nox -s build -- [--tag T] [--checkpoint SRC] [--cuda cu128]` (README "Deploy").
#
#   builder   uv installs requirements.txt into /opt/venv (torch from the PyTorch CUDA index), and stages the code
#   runtime   the base again + /opt/venv + the code; with CHECKPOINT set, the converted model in /models/$MODEL_NAME
#
# The base is a slim Debian Python, not an NVIDIA CUDA image: the torch CUDA wheels carry their own CUDA libraries
# (cuBLAS, cuDNN, NCCL, ... as nvidia-* wheels) and RunPod's container runtime mounts the driver, so a CUDA base
# would only add a second copy of the libraries (README "Deploy" has the sizes measured).

# An exact tag; for a bit-for-bit reproducible build pass the digest: --build-arg BASE_IMAGE=docker.io/library/python:3.11.14-slim-bookworm@sha256:...
ARG BASE_IMAGE=docker.io/library/python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS builder
# The PyTorch wheel index of one CUDA build: cu126, cu128, cu130 (or cpu).
ARG CUDA=cu128
ARG UV_VERSION=0.13.9
# A folder of wheels in the build context (offline build: `nox -s image_test`); empty: the package indexes.
ARG WHEELHOUSE=""
ENV UV_PYTHON_DOWNLOADS=never \
    UV_NO_CACHE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# One step (one layer): the context is mounted, not copied, so a wheelhouse never lands in a layer.
RUN --mount=type=bind,source=.,target=/src \
    sh /src/docker/install_requirements.sh /src /opt/venv "${CUDA}" "${UV_VERSION}" "${WHEELHOUSE}" \
    && mkdir -p /stage/convert /stage/app \
    && cp -r /src/core /src/model_build /stage/convert/ \
    && cp -r /src/worker /src/batch /src/test_input.json /stage/app/ \
    && python3 -m compileall -q --invalidation-mode checked-hash /stage

FROM ${BASE_IMAGE} AS runtime
# Build-time conversion. CHECKPOINT: a file in the build context (relative path), hf://owner/repo/file@<commit>, or an
# https URL (then CHECKPOINT_SHA256 too); empty: no model in the image (network volume). Declared first, where a step
# is cheap; their values only matter to the conversion step's cache.
# REFINER_CHECKPOINT likewise bakes an SDXL refiner into /models/$REFINER_NAME (both set, or neither).
ARG CHECKPOINT=""
ARG CHECKPOINT_SHA256=""
ARG MODEL_NAME=sdxl
ARG REFINER_CHECKPOINT=""
ARG REFINER_CHECKPOINT_SHA256=""
ARG REFINER_NAME=""
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MODEL_NAME=${MODEL_NAME} \
    REFINER_NAME=${REFINER_NAME}
WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
# The converter first and alone, so a change to the worker's code does not convert the model again.
COPY --from=builder /stage/convert /app
# A gated or private Hub file needs a token, given only as a build secret (--secret id=hf_token,src=FILE): it is read
# inside this one step and never lands in a layer, an ENV or the history.
RUN --mount=type=secret,id=hf_token,required=false \
    --mount=type=bind,source=.,target=/src \
    sh /src/docker/convert_checkpoint.sh "${CHECKPOINT}" "${CHECKPOINT_SHA256}" "/models/${MODEL_NAME}" /src \
    && if [ -n "${REFINER_CHECKPOINT}" ] && [ -z "${REFINER_NAME}" ]; then \
         echo "REFINER_CHECKPOINT needs REFINER_NAME (the folder under /models the worker loads)" >&2; exit 1; fi \
    && sh /src/docker/convert_checkpoint.sh "${REFINER_CHECKPOINT}" "${REFINER_CHECKPOINT_SHA256}" \
         "/models/${REFINER_NAME:-sdxl-refiner}" /src REFINER_CHECKPOINT
COPY --from=builder /stage/app /app
CMD ["python", "-u", "-m", "worker"]
