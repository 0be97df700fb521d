# Small, non-root image for both roles: `mora serve` (API) and `mora worker`.
FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mora_graphql ./mora_graphql
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip && /opt/venv/bin/pip install ".[otel]"

FROM python:3.12-slim
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    ENVIRONMENT=production HOST=0.0.0.0 PORT=8000
RUN useradd --system --uid 10001 --home-dir /app mora
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --chown=mora:mora pyproject.toml ./
COPY --chown=mora:mora migrations ./migrations
USER mora
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
CMD ["mora", "serve"]
