#!/usr/bin/env bash
# Checks the Dockerfile without a container engine: hadolint, every target the docs name exists,
# and every binary the images copy is one the workspace builds (`cargo build -p PKG --bin BIN`
# in the Dockerfile names a real package and binary target, per `cargo metadata`).
set -euo pipefail
cd "$(dirname "$0")/.."
hadolint Dockerfile
for target in build build-cuda dopd worker-cuda; do
  grep -Eq "^FROM .* AS ${target}\$" Dockerfile || { echo "Dockerfile: no stage ${target}"; exit 1; }
done
cargo metadata --format-version 1 --no-deps --locked >/tmp/dopd-metadata.json
python3 - Dockerfile /tmp/dopd-metadata.json <<'PY'
import json, re, sys
text = open(sys.argv[1]).read().replace("\\\n", " ")
meta = json.load(open(sys.argv[2]))
bins = {(p["name"], t["name"]) for p in meta["packages"] for t in p["targets"] if "bin" in t["kind"]}
features = {p["name"]: set(p["features"]) for p in meta["packages"]}
builds = re.findall(r"cargo build ([^&\n]*)", text)
if not builds:
    sys.exit("Dockerfile: no cargo build")
for b in builds:
    pkg = re.search(r"-p (\S+)", b).group(1)
    binary = re.search(r"--bin (\S+)", b).group(1)
    if (pkg, binary) not in bins:
        sys.exit(f"Dockerfile builds {pkg}/{binary}, which the workspace does not have (has {sorted(bins)})")
    feats = re.findall(r"--features (\S+)", b)
    for f in feats:
        for name in f.split(","):
            if name not in features[pkg]:
                sys.exit(f"Dockerfile: package {pkg} has no feature {name}")
    with_features = " with features " + ",".join(feats) if feats else ""
    print(f"docker-check: {pkg} builds binary {binary}{with_features}")
# The final images copy /out/dopd from the stage DOPD_BUILD / DOPD_BUILD_CUDA name, by default
# the build stages (scripts/images.sh can hand in a prebuilt binary the same way).
args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
for arg, stage, alias in [("DOPD_BUILD", "build", "dopd-binary"),
                          ("DOPD_BUILD_CUDA", "build-cuda", "dopd-cuda-binary")]:
    if args.get(arg) != stage:
        sys.exit(f"Dockerfile: ARG {arg} should default to the stage {stage}, not {args.get(arg)}")
    if not re.search(rf"^FROM \${{{arg}}} AS {alias}$", text, re.M):
        sys.exit(f"Dockerfile: no stage {alias} from ${{{arg}}}")
copies = re.findall(r"COPY --from=(\S+) (\S+)", text)
if not copies:
    sys.exit("Dockerfile: the images copy no binary")
for stage, src in copies:
    if stage not in ("dopd-binary", "dopd-cuda-binary") or src != "/out/dopd":
        sys.exit(f"Dockerfile copies {src} from {stage}; only /out/dopd of the binary stages is expected")
print("docker-check: the images copy /out/dopd, the binary the build stages install")
PY
