# CPU image by default; for CUDA pass a CUDA runtime base, e.g.
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t fgclip-vad:cuda .
# (the CUDA base needs python3.11 installed; the default slim base has it).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1 PIP_NO_CACHE_DIR=1

# git: DVC needs a repository; make: the same entry points as on a workstation.
RUN apt-get update && apt-get install -y --no-install-recommends git make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml requirements.lock README.md ./
COPY fgclip ./fgclip
COPY pipeline ./pipeline
# torch first, from the index that matches the base (CPU or CUDA), at the pinned version.
RUN python3 -m venv .venv \
    && .venv/bin/pip install --upgrade "pip>=24" \
    && .venv/bin/pip install --index-url ${TORCH_INDEX} torch==2.13.0 \
    && .venv/bin/pip install -c requirements.lock -e '.[dev]' \
    && touch .venv/.installed-stamp

COPY . .
# The image's default command is what `make repro` runs: the whole pipeline on the embedded sample.
RUN git init -q && git add -A && git -c user.name=docker -c user.email=docker@localhost commit -qm image
CMD ["make", "repro"]
