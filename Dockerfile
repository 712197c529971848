# edgemoe HTTP server image for linux/amd64 and linux/arm64.
#
# Build for both architectures (needs buildx; QEMU for the foreign one):
#   docker buildx build --platform linux/amd64,linux/arm64 -t edgemoe .
# Run with the built-in demo model, or mount an exported bundle over /bundle:
#   docker run --rm -p 127.0.0.1:8000:8000 edgemoe
#   docker run --rm -p 8000:8000 -e EDGEMOE_API_KEY=secret -v "$PWD/my-bundle:/bundle:ro" edgemoe
#
# BASE_IMAGE is any Debian-like image with python3 (3.10 or newer) and its venv module; the
# default python:3.11-slim is published for both architectures.
# NOTE: the build was tested on Debian 12 bases imported from debootstrap (arm64 under QEMU by
# android-harness/test-docker-arm64.sh, and amd64), not on python:3.11-slim itself.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
# Extra options for every pip install of the build stage. To build without access to PyPI, put
# the wheels (setuptools, onnx and the runtime dependencies, for the target architecture) in
# ./wheelhouse and pass --build-arg PIP_OPTIONS="--no-index --find-links /src/wheelhouse".
ARG PIP_OPTIONS=""
COPY . /src
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check ${PIP_OPTIONS} /src
# The demo model ships as a Hugging Face checkpoint; it is exported here so that the runtime
# image needs no onnx. onnx goes into a separate directory that the runtime stage does not copy.
# The export calls the exporter directly because `edgemoe export` imports onnxruntime, and
# onnxruntime 1.28 or newer crashes on import under QEMU emulation (it reads the build host's
# CPU cache sizes from /sys, which a build step cannot hide).
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check ${PIP_OPTIONS} --target /opt/onnx onnx \
    && PYTHONPATH=/opt/onnx /opt/venv/bin/python -c 'import sys; \
from edgemoe.export.writer import export_checkpoint; \
from edgemoe.runtime.demo import DEMO_CHECKPOINT; \
export_checkpoint(DEMO_CHECKPOINT, "/bundle", dtype="fp32", overwrite=False, progress=False)'

FROM ${BASE_IMAGE}
RUN useradd --system --uid 10001 --create-home --home-dir /home/edgemoe edgemoe
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=edgemoe:edgemoe /bundle /bundle
# EDGEMOE_HOST and EDGEMOE_BUNDLE are the environment twins of `serve --host` and its BUNDLE
# argument, so `docker run -e` or a mounted /bundle changes them without a new command line.
# An API key is not set by default: pass -e EDGEMOE_API_KEY=... whenever the port is reachable
# from other machines.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    EDGEMOE_HOST=0.0.0.0 \
    EDGEMOE_PORT=8000 \
    EDGEMOE_BUNDLE=/bundle \
    EDGEMOE_CACHE_DIR=/home/edgemoe/.cache/edgemoe
USER edgemoe
WORKDIR /home/edgemoe
EXPOSE 8000
# /health returns 503 while the model loads and 200 when it is ready; urlopen raises on 503.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('EDGEMOE_PORT', '8000') + '/health', timeout=4)"]
ENTRYPOINT ["edgemoe"]
CMD ["serve"]
