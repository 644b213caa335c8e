"""Cuts a distroless-like root filesystem out of a Debian one: the files a list names (from
`dpkg-query -L`), with the directories and symbolic links on their way as the source has them
(so /lib stays a link to usr/lib on a merged-/usr system), the CA bundle, and /etc/passwd and
/etc/group with root, nonroot (65532) and nobody. Usage: rootfs-slice.py SRC FILE_LIST DEST"""

import os
import shutil
import stat
import sys


def copy_path(src_root, dest_root, rel, depth=0):
    """Copies `rel` (relative, no leading slash) from src_root to dest_root: its parent
    directories first (links as links, with what they point to), then itself."""
    if depth > 40:
        sys.exit(f"rootfs-slice: too many links resolving {rel}")
    parts = [p for p in rel.split("/") if p]
    cur = ""
    for i, part in enumerate(parts):
        cur = f"{cur}/{part}" if cur else part
        src = os.path.join(src_root, cur)
        dst = os.path.join(dest_root, cur)
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(src)
            if not os.path.lexists(dst):
                os.symlink(target, dst)
            # What the link names, relative to the root, then the rest of the path through it.
            resolved = os.path.normpath(
                target.lstrip("/") if target.startswith("/") else os.path.join(os.path.dirname(cur), target)
            )
            rest = "/".join(parts[i + 1:])
            copy_path(src_root, dest_root, f"{resolved}/{rest}" if rest else resolved, depth + 1)
            return
        if stat.S_ISDIR(st.st_mode):
            if not os.path.isdir(dst):
                os.mkdir(dst)
                shutil.copystat(src, dst)
                os.chown(dst, st.st_uid, st.st_gid)
        elif stat.S_ISREG(st.st_mode) and i == len(parts) - 1:
            if not os.path.exists(dst):
                shutil.copy2(src, dst)
                os.chown(dst, st.st_uid, st.st_gid)


def main(src, listing, dest):
    os.makedirs(dest, exist_ok=True)
    with open(listing) as f:
        paths = [line.strip() for line in f if line.strip().startswith("/")]
    # The CA bundle is made by ca-certificates' post-install script, not shipped as a file.
    paths += ["/etc/ssl/certs/ca-certificates.crt", "/etc/ld.so.cache", "/etc/nsswitch.conf"]
    for p in paths:
        if p.startswith(("/usr/share/doc", "/usr/share/man", "/usr/share/info", "/usr/share/lintian")):
            continue
        copy_path(src, dest, p.lstrip("/"))
    for d, mode in [("tmp", 0o1777), ("proc", 0o555), ("sys", 0o555), ("dev", 0o755),
                    ("etc", 0o755), ("root", 0o700), ("home/nonroot", 0o700), ("run", 0o755)]:
        path = os.path.join(dest, d)
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode)
    os.chown(os.path.join(dest, "home/nonroot"), 65532, 65532)
    with open(os.path.join(dest, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/sbin/nologin\n"
                "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
                "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")
    with open(os.path.join(dest, "etc/group"), "w") as f:
        f.write("root:x:0:\nnogroup:x:65534:\nnonroot:x:65532:\n")
    for must in ["usr/lib/x86_64-linux-gnu/libc.so.6", "etc/ssl/certs/ca-certificates.crt"]:
        if not os.path.exists(os.path.join(dest, must)) and os.path.exists(os.path.join(src, must)):
            sys.exit(f"rootfs-slice: {must} was not copied")
    total = sum(os.lstat(os.path.join(dp, n)).st_size for dp, _, ns in os.walk(dest) for n in ns)
    print(f"rootfs-slice: {len(paths)} paths, {total / 1e6:.1f} MB")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
