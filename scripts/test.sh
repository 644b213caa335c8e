#!/usr/bin/env bash
# The test command: formatting, lints (warnings are errors), and every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
# kubectl and helm from scripts/setup.sh when the machine has none; pip's --user scripts.
export PATH="$PWD/.bin:$HOME/.local/bin:$PATH"
# Each step's header says when it starts (seconds since this script started), so a slow CI run
# shows where its time went.
step() { echo "== $* [at ${SECONDS}s]"; }
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy -D warnings"
# In the test profile, as the test build below: the build scripts and proc macros that clippy has to
# compile (not just check) are then the same units the test build needs, compiled once.
cargo clippy --profile test --workspace --all-targets --locked -- -D warnings
# The GPU features: cuda (serving on NVIDIA GPUs) and wgpu (the fused kernels' test on a Vulkan
# device), built once below. worker/Cargo.toml turns on in every build the features they turn on in
# shared dependencies, so the GPU build compiles only what depends on them, not the rest again. No
# clippy pass with them: checking their dependencies (wgpu, CubeCL, cudarc) took 8.5 minutes of an
# 85-minute run on a clean clone; the GPU build below compiles that code, its warnings errors.
# Our two crates that the GPU features change (compiled again for them anyway) are unoptimised in
# that build, as the GPU-only dependencies are (Cargo.toml): the cuda binary is only checked and
# packed here, and the fused-kernel test runs a tiny model.
gpu_features=(--workspace --features dopd/cuda,dopd-worker/wgpu --locked
  --config profile.test.package.dopd.opt-level=0
  --config profile.test.package.dopd-worker.opt-level=0)
step "layout: the router and the operator build no engine; files stay under ~800 lines"
scripts/layout-check.sh
step "GPU features: they change no shared crate's features (else the GPU build compiles it again)"
scripts/gpu-features-check.sh
step "Helm chart: lint, template, schema validation, CRD and examples"
scripts/chart-check.sh
step "Dockerfile: lint, and the binaries it copies are the workspace's"
scripts/docker-check.sh
step "cargo test"
# UCX tests run over loopback TCP unless the caller chose other transports.
export UCX_TLS=${UCX_TLS:-tcp}
cargo test --workspace --locked --no-run
step "cargo test: run"
cargo test --workspace --locked -- --skip workers_killed_at_random
step "chaos: workers of dopd up killed at random moments (seeded); nothing lost or changed"
# --workspace: the same packages as the test build above, so features unify the same way (with
# -p dopd alone, burn, the worker and dopd compiled again: 5 minutes of a clean run).
cargo test --workspace --test chaos --locked -- --nocapture
step "end to end: dopd up driven by the openai Python client"
scripts/e2e-local.sh target/debug/dopd
step "operator against a real control plane (kube-apiserver, controller-manager, scheduler, etcd, KWOK)"
# The control plane is built from Go modules once per machine (e2e/controlplane/build.sh, cached
# in ~/.cache/dopd/controlplane keyed by go.sum); it needs Go >= 1.26.
if command -v go >/dev/null 2>&1; then
  e2e/operator.sh target/debug/dopd
else
  echo "SKIPPED: the real-control-plane tier needs Go >= 1.26 to build Kubernetes' components: install Go and rerun"
fi
step "operator on a real cluster (skipped without one)"
e2e/cluster.sh target/debug/dopd
step "cargo doc"
# The test profile: the dependencies' metadata from the clippy step serves again.
RUSTDOCFLAGS="-D warnings" cargo doc --profile test --workspace --no-deps --locked --quiet
# The images take this run's test-profile builds (a release build would compile everything again):
# the plain binary as the tests left it, kept before the GPU build below replaces it.
mkdir -p target/images
strip -o target/images/dopd target/debug/dopd
step "GPU build: dopd with the cuda feature, and the fused GPU kernels against tensor operations on wgpu (Mesa's software Vulkan device)"
# One invocation in the test profile: the dependencies the tests compiled are reused, and the cuda
# binary and the fused-kernel test share the GPU features' build (the binary carries the wgpu
# backend too, unused: `dopd` never opens a wgpu device).
# Warnings of the workspace's crates are errors here too (dependencies' are capped by cargo).
gpu_log=target/gpu-build.log
cargo build --profile test "${gpu_features[@]}" --bin dopd --test fused_kernels 2>&1 |
  tee "$gpu_log"
if grep -q '^warning' "$gpu_log"; then
  echo "test: the GPU build has warnings (above); they are errors here" >&2
  exit 1
fi
strip -o target/images/dopd-cuda target/debug/dopd
# XDG_RUNTIME_DIR only quiets the Vulkan loader's complaint about a machine without a session.
XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} cargo test "${gpu_features[@]}" --test fused_kernels
step "container images: both targets built with buildah from local bases, run and exported"
# buildah (vfs, chroot) and the run's mount namespaces need root: CI has it; elsewhere, sudo
# without a password, or this step says it is skipped.
if [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then
  scripts/images.sh --dopd-binary target/images/dopd --cuda-binary target/images/dopd-cuda
else
  echo "SKIPPED: the container images need root (or sudo without a password): run scripts/images.sh as root"
fi
step "done"
