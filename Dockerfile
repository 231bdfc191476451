# The worker image for compose.yaml; built inside the enclave from its package mirror.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY services services
COPY schemas schemas
COPY replay replay
COPY policies policies
RUN pip install --no-cache-dir .
ENTRYPOINT []
