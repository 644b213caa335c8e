"""Checks an OCI image archive (`buildah push oci-archive:...`) the way an importer would read
it: oci-layout and index.json present, the index names REF (org.opencontainers.image.ref.name),
and every blob the index, manifest and config name is in the archive with the size and sha256
digest they give. Prints the image's layers and size. Usage: oci-check.py ARCHIVE REF"""

import hashlib
import json
import sys
import tarfile


def main(path, ref):
    with tarfile.open(path) as tar:
        members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}

        def read(name):
            if name not in members:
                sys.exit(f"{path}: {name} is missing")
            return tar.extractfile(members[name]).read()

        def blob(desc):
            algo, digest = desc["digest"].split(":", 1)
            if algo != "sha256":
                sys.exit(f"{path}: unsupported digest {desc['digest']}")
            data = read(f"blobs/sha256/{digest}")
            if len(data) != desc["size"]:
                sys.exit(f"{path}: blob {digest[:12]} is {len(data)} bytes, its descriptor says {desc['size']}")
            if hashlib.sha256(data).hexdigest() != digest:
                sys.exit(f"{path}: blob {digest[:12]} does not match its digest")
            return data

        layout = json.loads(read("oci-layout"))
        if layout.get("imageLayoutVersion") != "1.0.0":
            sys.exit(f"{path}: oci-layout version {layout.get('imageLayoutVersion')}")
        index = json.loads(read("index.json"))
        refs = [m for m in index.get("manifests", [])
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref]
        if len(refs) != 1:
            names = [m.get("annotations", {}) for m in index.get("manifests", [])]
            sys.exit(f"{path}: the index names {names}, not {ref}")
        manifest = json.loads(blob(refs[0]))
        config = json.loads(blob(manifest["config"]))
        total = 0
        for layer in manifest["layers"]:
            total += len(blob(layer))
        if len(manifest["layers"]) != len(config["rootfs"]["diff_ids"]):
            sys.exit(f"{path}: {len(manifest['layers'])} layers but {len(config['rootfs']['diff_ids'])} diff_ids")
        cfg = config.get("config", {})
        print(f"oci-check: {path}: {ref}, {len(manifest['layers'])} layers, "
              f"{total / 1e6:.1f} MB compressed, user {cfg.get('User', 'root')!r}, "
              f"entrypoint {cfg.get('Entrypoint')}, digests verified")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
