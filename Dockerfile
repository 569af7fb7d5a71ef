# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target train -t graft-train .   # CUDA runtime + the full locked stack: `graft run`
#   docker build --target serve -t graft-serve .   # onnxruntime-gpu only, no torch: `graft predict`
# Both install exactly what requirements.lock pins and run as a non-root user.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------- train
FROM ${CUDA_IMAGE} AS train
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
# The CUDA base image is pinned; its apt packages follow that Ubuntu release's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv git \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 graft
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install -r requirements.lock
COPY components ./components
COPY flows ./flows
COPY params.yaml dvc.yaml data.dvc ./
COPY .dvc/config ./.dvc/config
RUN /opt/venv/bin/pip install --no-deps . && chown -R graft /app
USER 10001
ENV PATH=/opt/venv/bin:$PATH
ENTRYPOINT ["graft"]
CMD ["run", "--summary", "outputs/summary.json"]

# ---------------------------------------------------------------- serve
FROM ${PYTHON_IMAGE} AS serve
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --create-home --uid 10001 graft
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
# the consumer side only: onnxruntime, image decoding, config, MLflow client for models:/ URIs,
# model-signing to verify signed models (GRAFT_VERIFY_KEY)
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c requirements.lock onnx onnxruntime-gpu numpy pillow pydantic pyyaml mlflow-skinny fastapi uvicorn python-multipart \
    model-signing pyopenssl
COPY components ./components
COPY flows ./flows
RUN /opt/venv/bin/pip install --no-deps . && chown -R graft /app
USER 10001
ENV PATH=/opt/venv/bin:$PATH
ENTRYPOINT ["graft", "predict"]
CMD ["--help"]
