# syntax=docker/dockerfile:1.7
# kuberlhf images. Two targets:
#   docker build --target operator -t kuberlhf-operator:dev .
#   docker build --target trainer  -t kuberlhf-trainer:dev .                               (CUDA, GPUs)
#   docker build --target trainer  --build-arg TRAINER_VARIANT=cpu -t kuberlhf-trainer:dev-cpu .   (kind, CPU pods)
# Versions are pinned to the ones the test suite runs with; bump them together.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
# cuda | cpu: which base the trainer target builds on
ARG TRAINER_VARIANT=cuda

# ---------------------------------------------------------------------------------------------------------------
# operator: kopf + the spec models, no torch (~150 MB instead of ~10 GB)
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer_image ./trainer_image
COPY operator ./operator
# "." is this project; its dependencies are pinned on the same command line.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[operator]" \
        "kopf==1.45.2" "kubernetes==37.0.1" "pydantic==2.14.4" "PyYAML==6.0.4" "boto3==1.44.8" \
        "typer==0.29.2" "prometheus-client==0.26.0" \
    && rm -rf /src \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/kuberlhf --shell /usr/sbin/nologin kuberlhf
WORKDIR /home/kuberlhf
USER 10001:10001
# liveness (/healthz) and Prometheus (/metrics)
EXPOSE 8080 9090
ENTRYPOINT ["kuberlhf-operator"]

# ---------------------------------------------------------------------------------------------------------------
# trainer base, CUDA: devel image so DeepSpeed's CUDA ops can be compiled at build time
FROM ${CUDA_IMAGE} AS trainer-base-cuda
# ENV, not ARG: the trainer stage below inherits it (build args do not cross stages)
ENV KUBERLHF_TORCH_INDEX=https://download.pytorch.org/whl/cu128
# A100 (8.0), A10/L4/RTX (8.6, 8.9), H100/H200 (9.0): the kernels DeepSpeed prebuilds below
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    DEBIAN_FRONTEND=noninteractive
# The base image tag pins the distribution release; Ubuntu drops superseded patch versions from its archive, so
# exact apt pins would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git ca-certificates libaio-dev \
    && rm -rf /var/lib/apt/lists/*
# Prebuild the ops the recipe uses on GPUs (fused Adam, CPU Adam for offload, the hybrid engine's inference
# kernels); others still JIT-compile on first use.
ENV DS_BUILD_FUSED_ADAM=1 \
    DS_BUILD_CPU_ADAM=1 \
    DS_BUILD_TRANSFORMER_INFERENCE=1

# trainer base, CPU: slim Python with a compiler for DeepSpeed's JIT-built CPU ops (kind, laptops)
FROM ${PYTHON_IMAGE} AS trainer-base-cpu
ENV KUBERLHF_TORCH_INDEX=https://download.pytorch.org/whl/cpu \
    DS_BUILD_OPS=0 \
    DS_ACCELERATOR=cpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libaio-dev \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------------------------
# trainer: every stage (`kuberlhf stage sft|reward|ppo`) and the chat server (`kuberlhf serve`)
# hadolint ignore=DL3006
FROM trainer-base-${TRAINER_VARIANT} AS trainer
ARG TORCH_VERSION=2.13.0
ARG DEEPSPEED_VERSION=0.19.8
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/kuberlhf \
    PATH=/opt/kuberlhf/bin:$PATH \
    HOME=/home/kuberlhf \
    HF_HOME=/home/kuberlhf/.cache/huggingface \
    TORCH_EXTENSIONS_DIR=/home/kuberlhf/.cache/torch_extensions
RUN python3 -m venv /opt/kuberlhf \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${KUBERLHF_TORCH_INDEX}" \
    && pip install --no-cache-dir "setuptools==84.2.1" "ninja==1.13.2" "packaging==26.4" "hjson==3.1.0" "py-cpuinfo==9.0.0" \
    && pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer_image ./trainer_image
COPY operator ./operator
# "." is this project; its dependencies are pinned on the same command line.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[trainer]" "torch==${TORCH_VERSION}" "deepspeed==${DEEPSPEED_VERSION}" \
        "transformers==5.24.0" "datasets==5.2.0" "peft==0.21.2" "accelerate==1.15.0" "safetensors==0.8.0" \
        "tokenizers==0.23.3" "boto3==1.44.8" "pydantic==2.14.4" "fastapi==0.165.0" "uvicorn==0.54.0" \
        "sse-starlette==3.7.0" "prometheus-client==0.26.0" \
    && rm -rf /src \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/kuberlhf --shell /usr/sbin/nologin kuberlhf \
    && mkdir -p /home/kuberlhf/.cache \
    && chown -R 10001:10001 /home/kuberlhf
WORKDIR /home/kuberlhf
USER 10001:10001
# the chat server's port (serving.port)
EXPOSE 8000
ENTRYPOINT ["kuberlhf"]
CMD ["--help"]
