# dsphere serving images: ONNX Runtime + FastAPI, no torch, no training code.
#
#   docker build -t dsphere:cpu .                 # CPU image (the default, last stage)
#   docker build --target cpu -t dsphere:cpu .    # same, explicit
#   docker build --target gpu -t dsphere:gpu .    # CUDA image (onnxruntime-gpu)
#
# No heredocs, no RUN --mount: builds with Docker (BuildKit or not) and with
# podman/buildah as Debian 12 ships them (deploy/local-image.sh, no registry needed).
#
# Both images serve model_store/ as copied at build time (bind-mount a host
# model_store over /srv/dsphere/model_store to add versions without a rebuild;
# docker-compose.yml does). See docs/DEPLOYMENT.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------
# requirements: the service's dependency list, read from pyproject.toml
# (base dependencies + the `serve` extra). The gpu list swaps onnxruntime for
# the `gpu` extra (onnxruntime-gpu): both wheels install the same `onnxruntime`
# module and must never be installed together. Fails the build if torch (or
# anything of the `train` extra) would end up in a serving image
# (deploy/serving_requirements.py).
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml deploy/serving_requirements.py ./
RUN python serving_requirements.py

# ---------------------------------------------------------------------------
# gpu: CUDA 12 + cuDNN 9 runtime (what onnxruntime-gpu >= 1.19 links against).
# Ubuntu 24.04's python3 is 3.12 (pyproject requires >= 3.11).
# ---------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu-build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY --from=requirements /src/requirements-gpu.txt /tmp/requirements.txt
# The installed set checked too, not only the list: no torch or onnx, and never the CPU
# onnxruntime wheel next to onnxruntime-gpu (`pip show` fails only when none is installed).
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install -r /tmp/requirements.txt \
 && ! /opt/venv/bin/pip show torch onnx onnxruntime >/dev/null 2>&1

FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /srv/dsphere --shell /usr/sbin/nologin dsphere \
 && mkdir -p /var/lib/dsphere/quarantine \
 && chown dsphere:dsphere /var/lib/dsphere/quarantine
COPY --from=gpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DSPHERE_MODEL_STORE=/srv/dsphere/model_store \
    DSPHERE_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider \
    DSPHERE_GRPC_PORT=8001 \
    DSPHERE_GRPC_HOST=0.0.0.0 \
    DSPHERE_WORKERS=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /srv/dsphere
COPY --chown=root:root app/ ./app/
COPY --chown=root:root gunicorn.conf.py ./
COPY --chown=root:root model_store/ ./model_store/
USER dsphere
# 8001: the Open Inference Protocol over gRPC (DSPHERE_GRPC_PORT; empty: off)
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]
# gunicorn (gunicorn.conf.py) with one worker here: one CUDA context per GPU, whose batches the
# micro-batcher fills; scale with replicas (docker compose --scale api=N).
CMD ["gunicorn", "-c", "gunicorn.conf.py", "--bind", "0.0.0.0:8000", "app.main:app"]

# ---------------------------------------------------------------------------
# cpu: python:3.11-slim + onnxruntime + openvino (the default target: last stage)
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=requirements /src/requirements-cpu.txt /tmp/requirements.txt
# Same check as gpu-build, with the flavours swapped. OpenVINO (DSPHERE_PRECISION=bf16) keeps its CPU
# plugin and ONNX frontend only: its GPU and NPU plugins, the other frameworks' frontends (and its
# torch.compile shim, openvino/torch), the C++ headers are never loaded here (about 80 MB).
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r /tmp/requirements.txt \
 && ! /opt/venv/bin/pip show torch onnx onnxruntime-gpu >/dev/null 2>&1 \
 && ov=$(echo /opt/venv/lib/python3*/site-packages/openvino) \
 && rm -rf "$ov"/include "$ov"/libs/cache.json "$ov"/libs/libopenvino_intel_gpu_plugin.so \
      "$ov"/libs/libopenvino_intel_npu_plugin.so "$ov"/libs/libopenvino_*tensorflow*_frontend.so* \
      "$ov"/libs/libopenvino_paddle_frontend.so* "$ov"/libs/libopenvino_pytorch_frontend.so* \
      "$ov"/libs/libopenvino_gguf_frontend.so* "$ov"/torch "$ov"/frontend/pytorch "$ov"/frontend/tensorflow \
      "$ov"/frontend/jax "$ov"/frontend/paddle \
 && /opt/venv/bin/python -c "import openvino as ov; ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')"

FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --system --uid 10001 --user-group --home-dir /srv/dsphere --shell /usr/sbin/nologin dsphere \
 && mkdir -p /var/lib/dsphere/quarantine \
 && chown dsphere:dsphere /var/lib/dsphere/quarantine
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DSPHERE_MODEL_STORE=/srv/dsphere/model_store \
    DSPHERE_PROVIDERS=CPUExecutionProvider \
    DSPHERE_GRPC_PORT=8001 \
    DSPHERE_GRPC_HOST=0.0.0.0 \
    DSPHERE_WORKERS=2 \
    DSPHERE_PRECISION=bf16
# bf16 on OpenVINO where the host CPU has AVX512-BF16 or AMX and the served version carries a passing
# precision record (verdicts agree with fp32 on >= 99.9 % of clean inputs); the fp32 ONNX Runtime
# reference otherwise, said in /healthz. DSPHERE_PRECISION=fp32 serves the reference (docs/SERVING.md).
WORKDIR /srv/dsphere
COPY --chown=root:root app/ ./app/
COPY --chown=root:root gunicorn.conf.py ./
COPY --chown=root:root model_store/ ./model_store/
USER dsphere
# 8001: the Open Inference Protocol over gRPC (DSPHERE_GRPC_PORT; empty: off)
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]
# Both cores: DSPHERE_WORKERS gunicorn workers of 1 inference thread each (gunicorn.conf.py; measured
# best on a 2-core machine, docs/SERVING.md "Workers"), /metrics summed over them, one query history
# for them (DSPHERE_QUERY_HISTORY_SHARED_DIR), a reload followed by all (DSPHERE_SERVED_MODEL_FILE).
CMD ["gunicorn", "-c", "gunicorn.conf.py", "--bind", "0.0.0.0:8000", "app.main:app"]
