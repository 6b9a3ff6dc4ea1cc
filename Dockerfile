# skytune's training images: a CUDA 13 base + one locked Python stack,
# images/<IMAGE>/requirements.lock. `default` holds torch 2.13.0 (CUDA 13.0 wheel),
# transformers, TRL, PEFT, bitsandbytes, Liger; `unsloth` holds Unsloth with the older
# transformers/TRL it pins (recipes with `adapter.backend: unsloth`). A SkyPilot job started
# from either installs nothing.
#
#   docker build -t ghcr.io/skytune/skytune:0.1.0-default .
#   docker build --build-arg IMAGE=unsloth -t ghcr.io/skytune/skytune:0.1.0-unsloth .
#   docker run --rm --gpus all ghcr.io/skytune/skytune:0.1.0-default skytune doctor
#
# The tags are defined once, in src/skytune/images.py; images/README.md covers pushing them
# and registry credentials.
#
# GPUs: torch's CUDA 13.0 wheel carries kernels for sm75..sm120, so A100 (sm80) and H100
# (sm90) work. The host needs an NVIDIA driver >= 580 (CUDA 13.0); the base image's
# NVIDIA_REQUIRE_CUDA makes the container refuse to start on an older one, with a message,
# instead of failing later inside torch.
FROM nvidia/cuda:13.0.1-base-ubuntu24.04

# Which images/<IMAGE>/requirements.lock to install: default | unsloth.
ARG IMAGE=default

# No ENTRYPOINT/CMD override: SkyPilot starts the container and runs its own commands.
# /cache holds every download and JIT cache so the image works as root or as any other
# user (HOME may be unset or read-only under `docker run --user`).
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
    TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    SKYTUNE_IMAGE=${IMAGE}

# Python 3.12 is Ubuntu 24.04's own. gcc + python3.12-dev: Triton (flex attention through
# torch.compile, Liger's kernels) compiles a small C launcher on first use and fails
# without them. rsync ... fuse: what SkyPilot apt-installs in every container it starts;
# having them here turns that step into a no-op. Ubuntu packages are not version-pinned:
# the base tag fixes the release, and the archive drops superseded versions, so pins
# would break rebuilds; the Python stack, which is what broke the seeds, is locked.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.12 python3.12-venv python3.12-dev gcc libc6-dev \
        ca-certificates git sudo rsync curl wget patch openssh-server python3-pip fuse \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv \
    && mkdir -p /cache/huggingface /cache/triton /cache/inductor \
    && chmod -R 1777 /cache

# The lock alone, before the source, so editing skytune does not re-download torch.
# --require-hashes: every file is checked against the lock; a package missing from the
# lock (or a changed upload) fails the build instead of being resolved at build time.
COPY images/${IMAGE}/requirements.lock /opt/skytune/requirements.lock
RUN pip install --no-cache-dir --require-hashes -r /opt/skytune/requirements.lock \
    && pip check

# skytune itself from this checkout, not from the lock: --no-deps because the lock already
# holds its dependencies; --no-build-isolation so the build uses the locked setuptools
# instead of fetching an unpinned one.
COPY pyproject.toml README.md /opt/skytune/src-tree/
COPY src /opt/skytune/src-tree/src
COPY images/smoke.py /opt/skytune/smoke.py
RUN pip install --no-cache-dir --no-deps --no-build-isolation /opt/skytune/src-tree \
    && rm -rf /opt/skytune/src-tree

# Smoke test: import every locked package at its locked version, then `skytune doctor`
# (no GPU at build time: that is a warning, not a failure).
RUN python /opt/skytune/smoke.py --lock /opt/skytune/requirements.lock
