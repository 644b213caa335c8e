# syntax=docker/dockerfile:1
#
# DOPD images, one file, two targets:
#
#   docker build --target dopd -t ghcr.io/dopd/dopd:0.1.0 .
#       the slim image of the operator and the router (distroless, non-root; run it with a
#       read-only root filesystem: the chart does);
#   docker build --target worker-cuda -t ghcr.io/dopd/dopd-worker-cuda:0.1.0 .
#       the GPU worker: CUDA user-space libraries, UCX, and `dopd` built with the `cuda` feature.
#
# Base images are build arguments (mirror them, pin digests). `scripts/images.sh` builds both
# targets with buildah from local bases (Debian bookworm by debootstrap, the machine's pinned
# Rust toolchain, CUDA libraries from NVIDIA's PyPI wheels) and runs them; it can also hand in
# binaries built outside (DOPD_BUILD / DOPD_BUILD_CUDA: an image holding /out/dopd).
# Model weights are not baked in: DopdService.spec.model.source names a path in the image or a
# PVC (`pvc://CLAIM/PATH`); the router reads only the tokenizer from it.
# scripts/docker-check.sh lints this file and checks that every binary copied below is one the
# workspace builds.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04
# The stage (or image) whose /out/dopd the final images copy.
ARG DOPD_BUILD=build
ARG DOPD_BUILD_CUDA=build-cuda

# ---- build-env: the toolchain, UCX's headers and the sources
FROM ${RUST_IMAGE} AS build-env
WORKDIR /src
# libucx-dev: the UCX layout test's headers; the binary loads libucp at run time only. Versions
# come from the pinned base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libucx-dev \
 && rm -rf /var/lib/apt/lists/*
COPY . .

# ---- build: the CPU binary (operator, router, CPU worker). The crate registry and the target
# folder are cache mounts: a rebuild compiles what changed.
FROM build-env AS build
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p dopd --bin dopd \
 && install -D -s -m 0755 target/release/dopd /out/dopd

# ---- build-cuda: the same binary with the CUDA backend. burn-cuda loads the driver and NVRTC
# at run time and compiles its kernels then, so the build needs no CUDA toolkit.
FROM build-env AS build-cuda
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p dopd --features cuda --bin dopd \
 && install -D -s -m 0755 target/release/dopd /out/dopd

FROM ${DOPD_BUILD} AS dopd-binary
FROM ${DOPD_BUILD_CUDA} AS dopd-cuda-binary

# ---- dopd: operator and router (and the CPU worker)
FROM ${RUNTIME_IMAGE} AS dopd
COPY --from=dopd-binary /out/dopd /usr/local/bin/dopd
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/dopd"]
CMD ["--help"]

# ---- worker-cuda: the GPU worker with UCX (RDMA, CUDA IPC, TCP). The base carries CUDA's
# user-space libraries (NVRTC, the runtime); the driver comes from the node.
FROM ${CUDA_RUNTIME_IMAGE} AS worker-cuda
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libucx0 ucx-utils \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin dopd
COPY --from=dopd-cuda-binary /out/dopd /usr/local/bin/dopd
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/dopd"]
CMD ["worker", "--device", "cuda"]
