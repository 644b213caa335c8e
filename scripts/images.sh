#!/usr/bin/env bash
# Builds DOPD's two container images from the Dockerfile without a container engine, runs them,
# and exports them as OCI archives.
#
#   scripts/images.sh [--dopd-binary PATH --cuda-binary PATH] [--out DIR]
#
# - Bases, made here and cached outside the repository (keyed by what they hold):
#     debian   Debian bookworm (debootstrap --variant=minbase);
#     runtime  a distroless-like slice of it (libc, libgcc, libstdc++, CA certificates, time
#              zones, users; no shell): the `dopd` image's base;
#     build    debian + a C toolchain, pkg-config, libucx-dev and this machine's pinned Rust
#              toolchain (copied in: nothing can download one inside a container);
#     cuda     debian + CUDA's user-space libraries (runtime, NVRTC) from NVIDIA's PyPI wheels.
# - Builds the targets `dopd` and `worker-cuda` with buildah (vfs storage, chroot isolation),
#   passing the bases as build arguments. By default the build stages compile the binaries
#   (cargo's registry and target folder are cache mounts, so a rebuild compiles what changed);
#   `--dopd-binary` and `--cuda-binary` (built with `--features cuda`) hand in binaries built
#   outside instead, as one-file images (DOPD_BUILD / DOPD_BUILD_CUDA): CI does, with the
#   debug builds its tests made.
# - Runs them: `dopd --help`; the `dopd` image as UID 65532 on a read-only root filesystem runs
#   `dopd up` with the test model mounted read-only from outside and answers a chat request; the
#   `worker-cuda` image finds libucp and the CUDA libraries and says that there is no GPU.
# - Exports OCI archives (`ctr images import`, `kind load image-archive`) to DIR (default dist/)
#   and checks every blob they name against its digest.
#
# Needs root (buildah with vfs storage and chroot isolation; the run uses mount namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

all_args=("$@")
dopd_bin=""
cuda_bin=""
out=dist
while [ $# -gt 0 ]; do
  case "$1" in
    --dopd-binary) dopd_bin=$2; shift ;;
    --cuda-binary) cuda_bin=$2; shift ;;
    --out) out=$2; shift ;;
    *) echo "images: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$dopd_bin$cuda_bin" ]; then
  from_source=1
elif [ -n "$dopd_bin" ] && [ -n "$cuda_bin" ]; then
  from_source=0
else
  echo "images: --dopd-binary and --cuda-binary go together (or neither: build from source)" >&2
  exit 2
fi

if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    exec sudo -n --preserve-env=PATH,DOPD_CACHE "$0" "${all_args[@]}"
  fi
  echo "images: needs root (buildah's vfs storage and chroot isolation, mount namespaces)" >&2
  exit 1
fi
for tool in buildah debootstrap unshare python3; do
  command -v "$tool" >/dev/null || { echo "images: $tool is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
cache=${DOPD_CACHE:-$HOME/.cache/dopd}/images
mkdir -p "$cache" "$out"
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
[ -n "$version" ] || { echo "images: no version in Cargo.toml [workspace.package]" >&2; exit 1; }
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -s "$model" ] || { echo "images: $model is missing (scripts/setup.sh fetches it)" >&2; exit 1; }
t_start=$(date +%s)
phase() { echo "== images: $* ($(( $(date +%s) - t_start )) s)"; }
have_image() { buildah images --quiet "$1" >/dev/null 2>&1; }
key() { printf '%s\n' "$@" | sha256sum | cut -c1-12; }

# ---- bases
suite=bookworm
# The runtime base's packages (what distroless's cc image holds, less what the binary never uses).
runtime_packages="base-files netbase tzdata libc6 libgcc-s1 libstdc++6"
# The Debian archive this machine's apt already uses (its sources name it; nothing is named here).
mirror=$(sed -n 's/^URIs: *\(\S*\/debian\)\/\?$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
[ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || { echo "images: no Debian archive in this machine's apt sources" >&2; exit 1; }

debian_key=$(key "$suite" minbase ca-certificates netbase tzdata v1)
debian_image=localhost/dopd-base-debian:$suite-$debian_key
runtime_key=$(key "$debian_key" "$runtime_packages" "$(sha256sum scripts/rootfs-slice.py)")
runtime_image=localhost/dopd-base-runtime:$suite-$runtime_key
rootfs=$cache/rootfs-$suite-$debian_key.tar
slim=$cache/rootfs-$suite-$runtime_key-runtime.tar
if ! have_image "$debian_image" || ! have_image "$runtime_image"; then
  if [ ! -s "$rootfs" ] || [ ! -s "$slim" ]; then
    phase "debootstrap $suite (minbase)"
    tmp=$(mktemp -d)
    debootstrap --variant=minbase --include=ca-certificates,netbase,tzdata "$suite" "$tmp/root" "$mirror" \
      >"$tmp/log" 2>&1 || { tail -20 "$tmp/log"; echo "images: debootstrap failed" >&2; exit 1; }
    # What no image needs: package lists, caches, documentation.
    rm -rf "$tmp"/root/var/lib/apt/lists/* "$tmp"/root/var/cache/apt/*.bin \
      "$tmp"/root/usr/share/doc/* "$tmp"/root/usr/share/man/* "$tmp"/root/usr/share/info/*
    # The runtime base, as distroless's cc image: the files of a few packages (no shell, no
    # package manager), the CA bundle, and the users root, nonroot (65532) and nobody.
    for p in $runtime_packages; do chroot "$tmp/root" dpkg-query -L "$p"; done >"$tmp/files"
    python3 scripts/rootfs-slice.py "$tmp/root" "$tmp/files" "$tmp/slim"
    tar -C "$tmp/slim" --numeric-owner -cf "$slim.part" . && mv "$slim.part" "$slim"
    tar -C "$tmp/root" --numeric-owner -cf "$rootfs.part" . && mv "$rootfs.part" "$rootfs"
    rm -rf "$tmp"
  fi
  for pair in "$debian_image $rootfs /bin/bash" "$runtime_image $slim"; do
    set -- $pair
    phase "base $1"
    c=$(buildah from scratch)
    buildah add --quiet "$c" "$2" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
    [ -z "${3:-}" ] || buildah config --cmd "$3" "$c"
    buildah commit --quiet --rm "$c" "$1" >/dev/null
  done
fi

toolchain=$(rustc --print sysroot)
rust_version=$(rustc --version)
build_key=$(key "$debian_key" "$rust_version" build-essential pkg-config libucx-dev v1)
build_image=localhost/dopd-base-build:$suite-$build_key
if [ $from_source = 1 ] && ! have_image "$build_image"; then
  phase "base $build_image ($rust_version from $toolchain)"
  c=$(buildah from "$debian_image")
  buildah run "$c" -- sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends build-essential pkg-config libucx-dev ca-certificates >/dev/null && rm -rf /var/lib/apt/lists/*'
  # The toolchain without its documentation; cargo and rustc run from it directly.
  buildah run "$c" -- mkdir -p /usr/local/rust /usr/local/cargo
  for d in bin lib libexec; do
    [ -d "$toolchain/$d" ] && buildah copy --quiet "$c" "$toolchain/$d" "/usr/local/rust/$d" >/dev/null
  done
  buildah config --env CARGO_HOME=/usr/local/cargo \
    --env PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
  buildah run "$c" -- rustc --version
  buildah commit --quiet --rm "$c" "$build_image" >/dev/null
fi

cuda_runtime_wheel=nvidia-cuda-runtime-cu12==12.6.77
cuda_nvrtc_wheel=nvidia-cuda-nvrtc-cu12==12.6.85
cuda_key=$(key "$debian_key" "$cuda_runtime_wheel" "$cuda_nvrtc_wheel" v2)
cuda_image=localhost/dopd-base-cuda:$suite-$cuda_key
if ! have_image "$cuda_image"; then
  wheels=$cache/wheels-$cuda_key
  if [ ! -d "$wheels/lib" ]; then
    phase "CUDA libraries from PyPI ($cuda_runtime_wheel, $cuda_nvrtc_wheel)"
    rm -rf "$wheels" && mkdir -p "$wheels/dl"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
      --dest "$wheels/dl" "$cuda_runtime_wheel" "$cuda_nvrtc_wheel"
    python3 - "$wheels" <<'PY'
import glob, os, sys, zipfile
dest = sys.argv[1]
for whl in glob.glob(os.path.join(dest, "dl", "*.whl")):
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            # nvidia/<component>/lib/<lib> and nvidia/<component>/include/<header>
            if (len(parts) >= 4 and parts[0] == "nvidia" and parts[2] in ("lib", "include")
                    and not info.is_dir() and not parts[-1].endswith(".py")):
                target = os.path.join(dest, parts[2], *parts[3:])
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    dst.write(src.read())
PY
    ls "$wheels"/lib/libnvrtc.so.* >/dev/null && ls "$wheels"/lib/libcudart.so.* >/dev/null
  fi
  phase "base $cuda_image"
  c=$(buildah from "$debian_image")
  buildah copy --quiet "$c" "$wheels/lib" /usr/local/cuda/lib64 >/dev/null
  buildah copy --quiet "$c" "$wheels/include" /usr/local/cuda/include >/dev/null
  buildah run "$c" -- sh -c 'echo /usr/local/cuda/lib64 > /etc/ld.so.conf.d/cuda.conf && ldconfig'
  # As NVIDIA's images: the container toolkit mounts the driver when these ask for it.
  buildah config --env NVIDIA_VISIBLE_DEVICES=all --env NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    --env LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64 "$c"
  buildah commit --quiet --rm "$c" "$cuda_image" >/dev/null
fi

# ---- build the targets
build_args=(--build-arg "RUNTIME_IMAGE=$runtime_image" --build-arg "CUDA_RUNTIME_IMAGE=$cuda_image"
            --build-arg "RUST_IMAGE=$build_image")
# An image holding one binary at /out/dopd (what the build stages leave), for DOPD_BUILD*.
binary_image() {
  local bin=$1 name=$2 sum c
  [ -x "$bin" ] || { echo "images: $bin is missing (build it, or pass --from-source)" >&2; exit 1; }
  sum=$(sha256sum "$bin" | cut -c1-12)
  if ! have_image "localhost/$name:$sum"; then
    c=$(buildah from scratch)
    buildah copy --quiet --chmod 0755 "$c" "$bin" /out/dopd >/dev/null
    buildah commit --quiet --rm "$c" "localhost/$name:$sum" >/dev/null
  fi
  echo "localhost/$name:$sum"
}
if [ $from_source = 1 ]; then
  # The build stages as images of their own, handed to the final stages like a prebuilt binary:
  # buildah 1.28 does not resolve a stage name that reaches FROM through an argument (BuildKit
  # does, so `docker build` needs none of this).
  for pair in "build dopd-build" "build-cuda dopd-cuda-build"; do
    set -- $pair
    phase "build --target $1 (cargo build --release in the container)"
    t0=$(date +%s)
    # The build trusts what this machine trusts (a proxy's CA, say) while cargo fetches crates.
    buildah build --quiet --layers --target "$1" "${build_args[@]}" -t "localhost/$2:$version" \
      --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
      -f Dockerfile . >/dev/null
    echo "images: --target $1 built in $(( $(date +%s) - t0 )) s"
  done
  build_args+=(--build-arg "DOPD_BUILD=localhost/dopd-build:$version"
               --build-arg "DOPD_BUILD_CUDA=localhost/dopd-cuda-build:$version")
else
  prebuilt=$(binary_image "$dopd_bin" dopd-prebuilt)
  prebuilt_cuda=$(binary_image "$cuda_bin" dopd-cuda-prebuilt)
  build_args+=(--build-arg "DOPD_BUILD=$prebuilt" --build-arg "DOPD_BUILD_CUDA=$prebuilt_cuda")
fi
dopd_image=localhost/dopd:$version
cuda_worker_image=localhost/dopd-worker-cuda:$version
for target in dopd worker-cuda; do
  tag=$dopd_image; [ $target = worker-cuda ] && tag=$cuda_worker_image
  phase "build --target $target -> $tag"
  t0=$(date +%s)
  buildah build --quiet --layers --target "$target" "${build_args[@]}" -t "$tag" -f Dockerfile . >/dev/null
  echo "images: $tag built in $(( $(date +%s) - t0 )) s"
done

# ---- run them
# Runs IMAGE as its config says (user, entrypoint, environment) on a read-only root filesystem,
# in its own mount and PID namespaces, as a container runtime sets one up (/proc, /sys read-only,
# a /dev holding only the usual character devices and a /dev/shm), with the model folder mounted
# read-only at /models; arguments replace the image's CMD. The network
# is the host's (loopback), so a test can reach what it serves.
run_image() {
  local image=$1; shift
  local c mnt cfg
  c=$(buildah from --quiet "$image")
  mnt=$(buildah mount "$c")
  mkdir -p "$mnt/models"
  cfg=$(buildah inspect --type container "$c")
  python3 - "$cfg" "$mnt" "$root/models" "$@" >"$mnt.run.sh" <<'PY'
import json, shlex, sys
cfg = json.loads(sys.argv[1])["OCIv1"]["config"]
root, models, args = sys.argv[2], sys.argv[3], sys.argv[4:]
user = cfg.get("User") or "0:0"
if ":" not in user:
    user += ":" + user
argv = (cfg.get("Entrypoint") or []) + (args or cfg.get("Cmd") or [])
env = cfg.get("Env") or []
q = shlex.quote
print("set -e")
print(f"r={q(root)}")
print('mount --bind "$r" "$r" && mount -o remount,bind,ro "$r"')
print('mount -t proc proc "$r/proc"')
print('mount -t tmpfs -o nosuid,mode=755 dev "$r/dev"')
print('for d in null zero full random urandom tty; do touch "$r/dev/$d"; mount --bind "/dev/$d" "$r/dev/$d"; done')
print('mkdir "$r/dev/shm" && mount -t tmpfs -o nosuid,nodev,mode=1777 shm "$r/dev/shm"')
print('mount --bind /sys "$r/sys" && mount -o remount,bind,ro "$r/sys"')
print(f'mount --bind -o ro {q(models)} "$r/models"')
print(f"exec /usr/bin/env -i {' '.join(q(e) for e in env)} HOME=/ /usr/sbin/chroot --userspec={q(user)} \"$r\" {' '.join(q(a) for a in argv)}")
PY
  echo "images: run $image as user $(buildah inspect --type container --format '{{.OCIv1.Config.User}}' "$c"), read-only root: ${*:-(its CMD)}" >&2
  local rc=0
  if [ -n "${RUN_PIDFILE:-}" ]; then
    # In the background for a caller that stops it: the PID of unshare, whose child is the
    # image's process (PID 1 in its namespace).
    unshare --mount --pid --fork --propagation private sh "$mnt.run.sh" &
    echo $! >"$RUN_PIDFILE"
    wait $! || rc=$?
  else
    unshare --mount --pid --fork --propagation private sh "$mnt.run.sh" || rc=$?
  fi
  rm -f "$mnt.run.sh"
  buildah umount "$c" >/dev/null
  buildah rm "$c" >/dev/null
  return $rc
}

phase "run: dopd --help"
run_image "$dopd_image" --help | head -3

phase "run: dopd up in the dopd image, read-only root, UID 65532"
log=$(mktemp)
pidfile=$(mktemp)
RUN_PIDFILE=$pidfile run_image "$dopd_image" up --model "/models/$(basename "$model")" \
  --listen 127.0.0.1:0 --served-model-name smollm2 --no-planner >"$log" 2>&1 &
up_pid=$!
# Ctrl-C to `dopd up` (the child of unshare), which stops its workers and exits.
stop_up() {
  local u
  u=$(cat "$pidfile" 2>/dev/null || true)
  [ -z "$u" ] || pkill -INT -P "$u" 2>/dev/null || true
  wait "$up_pid" 2>/dev/null || true
}
trap stop_up EXIT
# The address it chose, as scripts/up-lib.sh reads it, then /health.
host=""
for _ in $(seq 1 600); do
  [ -n "$host" ] || host=$(sed -n 's|.* on \(http://[0-9.:]*\)/v1 .*|\1|p' "$log" | head -1)
  if [ -n "$host" ] && curl -sf "$host/health" >/dev/null 2>&1; then break; fi
  kill -0 "$up_pid" 2>/dev/null || { cat "$log"; echo "images: dopd up exited" >&2; exit 1; }
  sleep 0.5
done
[ -n "$host" ] || { cat "$log"; echo "images: dopd up printed no address" >&2; exit 1; }
request='{"model":"smollm2","messages":[{"role":"user","content":"What is the capital of France? Answer in one word."}],"max_tokens":16,"temperature":0}'
echo "images: POST /v1/chat/completions $request"
for _ in $(seq 1 120); do
  answer=$(curl -s "$host/v1/chat/completions" -H 'content-type: application/json' -d "$request" || true)
  case "$answer" in *'"choices"'*) break ;; esac
  sleep 1
done
echo "images: answer $answer"
stop_up
trap - EXIT
grep -E "^dopd up|ready|listening" "$log" | head -5 || true
case "$answer" in
  *Paris*) echo "images: the dopd image answered from a read-only root as UID 65532" ;;
  *) cat "$log"; echo "images: no Paris in the answer" >&2; exit 1 ;;
esac
rm -f "$log" "$pidfile"

phase "run: the worker-cuda image without a GPU"
doctor=$(run_image "$cuda_worker_image" doctor --device cuda 2>&1) && { echo "$doctor"; echo "images: doctor found a GPU here?" >&2; exit 1; }
echo "$doctor"
grep -Eq "^ucx: libucp [0-9.]+ with transports [a-z]" <<<"$doctor" \
  || { echo "images: the worker-cuda image's doctor found no usable UCX transport" >&2; exit 1; }
for want in "cuda: /usr/local/cuda/lib64/libnvrtc.so" "cuda: /usr/local/cuda/lib64/libcudart.so" "no GPU present"; do
  grep -qF "$want" <<<"$doctor" || { echo "images: the worker-cuda image's doctor did not say '$want'" >&2; exit 1; }
done
worker=$(run_image "$cuda_worker_image" worker --device cuda --model "/models/$(basename "$model")" 2>&1) \
  && { echo "$worker"; echo "images: the CUDA worker started without a GPU?" >&2; exit 1; }
echo "$worker"
grep -q "libcuda.so.1) was not found" <<<"$worker" \
  || { echo "images: the CUDA worker did not say the driver is missing" >&2; exit 1; }

# ---- export
phase "export OCI archives to $out/"
for pair in "$dopd_image ghcr.io/dopd/dopd:$version dopd" \
            "$cuda_worker_image ghcr.io/dopd/dopd-worker-cuda:$version dopd-worker-cuda"; do
  set -- $pair
  archive=$out/$3-$version.oci.tar
  rm -f "$archive"
  buildah push --quiet "$1" "oci-archive:$archive:$2" >/dev/null
  python3 scripts/oci-check.py "$archive" "$2"
done

phase "sizes"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -E "localhost/dopd(-worker-cuda)?:$version " || true
ls -l "$out"/*.oci.tar | awk '{printf "images: %s %.1f MB\n", $NF, $5/1e6}'
phase "done"
