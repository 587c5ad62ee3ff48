# hotswap image: `hotswap serve` over a mounted base model and registry.
#   docker build -t hotswap .
#   docker run -p 50051:50051 -p 8000:8000 -p 9090:9090 -v $PWD/base:/models/base:ro \
#     -v $PWD/registry:/data/registry \
#     -v $PWD/tokens.toml:/etc/hotswap/tokens.toml:ro hotswap
# The settings are deploy/serve.toml (copied to /etc/hotswap/serve.toml); mount your own over it, or
# append flags, which win: `docker run ... hotswap serve --config /etc/hotswap/serve.toml --max-batch 64`.
# The image carries Ray (the ray extra) for `hotswap serve --ray` and KubeRay (deploy/rayservice.yaml);
# build with --build-arg EXTRAS=build for a single-server image without it (gguf: `hotswap base import` in the image).
FROM python:3.11-slim

# CPU wheels by default; build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 for CUDA.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=ray,gguf
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HOTSWAP_REGISTRY=/data/registry

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX}" "torch>=2.4"
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY proto ./proto
COPY hotswap ./hotswap
COPY registry ./registry
COPY train ./train
COPY serve ./serve
COPY methods ./methods
# The build generates the gRPC stubs from proto/ (setup.py).
RUN pip install ".[${EXTRAS}]" && useradd --create-home --uid 1000 hotswap \
    && mkdir -p /data/registry /models /etc/hotswap && chown -R hotswap /data
COPY deploy/serve.toml /etc/hotswap/serve.toml

USER hotswap
VOLUME ["/data"]
# gRPC, Prometheus /metrics, the OpenAI-compatible HTTP API (deploy/serve.toml's http_port; with Ray: on Serve's
# HTTP proxy); with Ray: Serve's gRPC proxy, Ray's metrics endpoint
EXPOSE 50051 9090 8000 9000 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["hotswap", "health", "--server", "127.0.0.1:50051", "--timeout", "4"]
ENTRYPOINT ["hotswap"]
CMD ["serve", "--config", "/etc/hotswap/serve.toml"]
