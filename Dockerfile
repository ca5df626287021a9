# exlogare-exporter: the README's install steps in a slim, non-root image.
#   docker build -t exlogare-exporter .
#   docker run -p 10450:10450 -v "$PWD/config.yaml:/etc/exlogare-exporter/config.yaml:ro" \
#     -e EXLOGARE_TOKEN_ACME=exl_... exlogare-exporter
# Tokens come from the environment (token_env) or from mounted files such as /run/secrets/* (token_file).
FROM python:3.12-slim-bookworm

LABEL org.opencontainers.image.title="exlogare-exporter" \
      org.opencontainers.image.description="Prometheus exporter for the Exlogare Read API v1" \
      org.opencontainers.image.source="https://github.com/exlogare/exlogare-exporter" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EXLOGARE_EXPORTER_CONFIG=/etc/exlogare-exporter/config.yaml

WORKDIR /app

# The README's steps: pip install -r requirements.txt, then python exporter.py --config FILE.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY exporter.py ./
COPY exlogare_exporter ./exlogare_exporter

RUN groupadd --system --gid 10450 exlogare \
    && useradd --system --uid 10450 --gid 10450 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin exlogare
USER 10450:10450

EXPOSE 10450

# No curl in a slim image: Python asks /healthz. Set EXLOGARE_HEALTHCHECK_URL for another port, or https://
# with --web.config.file TLS (on loopback the certificate is not checked; keep /healthz unauthenticated).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, ssl, urllib.request; urllib.request.urlopen(os.environ.get('EXLOGARE_HEALTHCHECK_URL', 'http://127.0.0.1:10450/healthz'), timeout=4, context=ssl._create_unverified_context())"]

# The config is read from $EXLOGARE_EXPORTER_CONFIG; arguments after the image name are added, e.g.
# `docker run … exlogare-exporter --log-format json`.
ENTRYPOINT ["python", "exporter.py"]
