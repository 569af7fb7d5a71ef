# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target train -t graft-train .   # the full locked stack: `graft run`
#   docker build --target serve -t graft-serve .   # onnxruntime-gpu and the CUDA libraries it loads, no torch: `graft serve`
# Both install exactly what requirements.lock pins and run as a non-root user.
#
# CUDA comes from the locked wheels, not from a CUDA base image: torch 2.14.1 (+cu130) depends on the
# CUDA 13.0 runtime, cuBLAS 13, cuFFT, cuRAND and cuDNN 9 pip wheels (nvidia-cuda-runtime, nvidia-cublas,
# nvidia-cufft, nvidia-curand, nvidia-cudnn-cu13 in requirements.lock), and onnxruntime-gpu 1.31 was built
# for the same CUDA 13 and cuDNN 9, so both images carry one CUDA, the one the lock names. The host needs
# an NVIDIA driver for CUDA 13.0 (580 or newer) and the NVIDIA Container Toolkit (`docker run --gpus all`),
# which provides libcuda.so.1.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------- train
FROM ${PYTHON_IMAGE} AS train
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib
RUN useradd --create-home --uid 10001 graft
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r requirements.lock
COPY components ./components
COPY flows ./flows
# no data.dvc and no DVC remote: the image trains on the folder mounted at /app/data (or `--data DIR`) as it is,
# versioned by its own md5; pulling and checking it against data.dvc is the project checkout's job
COPY params.yaml dvc.yaml ./
RUN /opt/venv/bin/pip install --no-deps . && chown -R graft /app
USER 10001
ENV PATH=/opt/venv/bin:$PATH
# the commit each run records (the image has no git history): docker build --build-arg GRAFT_GIT_COMMIT=$(git rev-parse HEAD);
# declared last, so a new commit does not rebuild the layers above it
ARG GRAFT_GIT_COMMIT=unknown
ENV GRAFT_GIT_COMMIT=${GRAFT_GIT_COMMIT}
ENTRYPOINT ["graft"]
CMD ["run", "--summary", "outputs/summary.json"]

# ---------------------------------------------------------------- serve
FROM ${PYTHON_IMAGE} AS serve
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN useradd --create-home --uid 10001 graft
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
# the consumer side only: onnxruntime-gpu and the CUDA 13 / cuDNN 9 wheels it loads (the lock's versions), image
# decoding, config, the MLflow client for models:/ URIs, the HTTP service, model-signing to verify signed models
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c requirements.lock onnx onnxruntime-gpu \
    nvidia-cuda-runtime nvidia-cublas nvidia-cufft nvidia-curand nvidia-cudnn-cu13 \
    numpy pillow pydantic pyyaml mlflow-skinny fastapi uvicorn python-multipart model-signing pyopenssl
# fail the build unless every library onnxruntime-gpu's CUDA provider links to is in the image (libcuda.so.1 comes
# from the host's driver at `docker run --gpus all`)
RUN missing="$(ldd /opt/venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so \
      | grep 'not found' | grep -v 'libcuda.so.1' || true)" \
 && if [ -n "$missing" ]; then echo "onnxruntime-gpu cannot load: $missing"; exit 1; fi
COPY components ./components
COPY flows ./flows
RUN /opt/venv/bin/pip install --no-deps . && chown -R graft /app
USER 10001
ENV PATH=/opt/venv/bin:$PATH
EXPOSE 8000
# ready once a model that passed every trust check is loaded (graft serve exits if the first one fails them)
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4).status != 200)"]
ENTRYPOINT ["graft", "serve"]
CMD ["--model", "models:/graft-digits@champion", "--host", "0.0.0.0", "--port", "8000", "--variant", "auto"]
