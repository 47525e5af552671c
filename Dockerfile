# syntax=docker/dockerfile:1
# mailbridge: one image, two programs.
#   mailbridge            the SMTP → signed-webhook bridge (the entrypoint)
#   mailbridge-operator   the Kubernetes operator (run it as the command)
#
#   docker build -t mailbridge .
#   docker run --rm -p 2525:2525 -e MAILBRIDGE_SMTP__HOST=0.0.0.0 mailbridge
#
# Runs as UID/GID 10001 (the operator's bridge pods and the Helm chart say the
# same), with a read-only root filesystem: it writes only to the spool volume
# /var/spool/mailbridge (also the working directory) and /tmp.
# tests/charts/test_image.py runs these steps without a Docker engine.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the wheel, and a virtual environment with it and its dependencies ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY operator/ operator/
# The venv gets no pip of its own: the build stage's pip installs into it.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/mailbridge \
 && python -m pip --python /opt/mailbridge/bin/python install /wheels/mailbridge-*.whl

# --- runtime: the same base, the virtual environment, no build tools -----------
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="mailbridge" \
      org.opencontainers.image.description="Receive email over SMTP and deliver it as signed JSON webhooks; with a Kubernetes operator." \
      org.opencontainers.image.url="https://github.com/mailbridge/mailbridge" \
      org.opencontainers.image.source="https://github.com/mailbridge/mailbridge" \
      org.opencontainers.image.documentation="https://github.com/mailbridge/mailbridge/blob/main/docs/kubernetes.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="mailbridge" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"

RUN groupadd --system --gid 10001 mailbridge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /var/spool/mailbridge --shell /usr/sbin/nologin mailbridge \
 && install -d -o 10001 -g 10001 -m 0750 /var/spool/mailbridge

COPY --from=build /opt/mailbridge /opt/mailbridge

ENV PATH=/opt/mailbridge/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001:10001
WORKDIR /var/spool/mailbridge
VOLUME ["/var/spool/mailbridge"]
# SMTP, and HTTP for /healthz, /readyz and /metrics.
EXPOSE 2525 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["mailbridge"]
