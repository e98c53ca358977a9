# One image for the API and the GPU worker; docker-compose.yml picks the command per service.
# torch comes from PyPI pinned first: PyPI's Linux x86_64 wheels are the CUDA builds (with their nvidia-* runtime
# wheels), so the worker sees the GPU with only the NVIDIA container toolkit on the host; the API never imports it.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data

WORKDIR /srv/modelpress

RUN pip install "torch==${TORCH_VERSION}"

# Dependencies from pyproject alone, so a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "torch==${TORCH_VERSION}" \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY modelpress ./modelpress
COPY app ./app
COPY worker ./worker
RUN pip install --no-deps . \
    && useradd --create-home --uid 1000 modelpress \
    && mkdir -p /data \
    && chown modelpress:modelpress /data

USER modelpress
VOLUME ["/data"]
EXPOSE 8000

# The API by default; the worker service runs `python -m worker`.
CMD ["python", "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
