# syntax=docker/dockerfile:1
#
# DOPD images, one file, two targets:
#
#   docker build --target dopd -t ghcr.io/dopd/dopd:0.1.0 .
#       the slim image of the operator and the router (distroless, non-root; run it with a
#       read-only root filesystem: the chart does);
#   docker build --target worker-cuda -t ghcr.io/dopd/dopd-worker-cuda:0.1.0 .
#       the GPU worker: CUDA runtime, UCX, and `dopd` built with the `cuda` feature.
#
# Base images are build arguments (mirror them, pin digests). Model weights are not baked in:
# DopdService.spec.model.source names a path in the image or a PVC (`pvc://CLAIM/PATH`); the
# router reads only the tokenizer from it.
# scripts/docker-check.sh lints this file and checks that every binary copied below is one the
# workspace builds.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

# ---- build: the CPU binary (operator, router, CPU worker)
FROM ${RUST_IMAGE} AS build
WORKDIR /src
# libucx-dev: the UCX layout test's headers; the binary loads libucp at run time only. Versions
# come from the pinned base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libucx-dev \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked -p dopd --bin dopd \
 && install -D -m 0755 target/release/dopd /out/dopd

# ---- build-cuda: the same binary with the CUDA backend
FROM ${CUDA_DEVEL_IMAGE} AS build-cuda
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config libucx-dev \
 && rm -rf /var/lib/apt/lists/*
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain none
WORKDIR /src
COPY . .
# rust-toolchain.toml pins the toolchain; rustup installs it on first use.
RUN cargo build --release --locked -p dopd --features cuda --bin dopd \
 && install -D -m 0755 target/release/dopd /out/dopd

# ---- dopd: operator and router (and the CPU worker)
FROM ${RUNTIME_IMAGE} AS dopd
COPY --from=build /out/dopd /usr/local/bin/dopd
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/dopd"]
CMD ["--help"]

# ---- worker-cuda: the GPU worker with UCX (RDMA, CUDA IPC, TCP)
FROM ${CUDA_RUNTIME_IMAGE} AS worker-cuda
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libucx0 ucx-utils \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin dopd
COPY --from=build-cuda /out/dopd /usr/local/bin/dopd
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/dopd"]
CMD ["worker", "--device", "cuda"]
