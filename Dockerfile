# hotswap image. The default command is the CLI until the gRPC server lands; mount a registry at
# /data/registry (HOTSWAP_REGISTRY) and base checkpoints under /models.
FROM python:3.11-slim

# CPU wheels by default; build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 for CUDA.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HOTSWAP_REGISTRY=/data/registry

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX}" "torch>=2.4"
COPY pyproject.toml README.md ./
COPY hotswap ./hotswap
COPY registry ./registry
COPY train ./train
COPY serve ./serve
RUN pip install . && useradd --create-home --uid 1000 hotswap && mkdir -p /data /models && chown hotswap /data

USER hotswap
VOLUME ["/data"]
ENTRYPOINT ["hotswap"]
CMD ["--help"]
