#!/usr/bin/env python3
"""Make a boot-time overlay cpio with amnesiac's own writer (read-only import from /work/main/src).
usage: overlay.py OUT.cpio PUBKEY [SRC_DIR DEST_PREFIX]...  (files under SRC_DIR go to DEST_PREFIX/...)"""
import os, stat, sys
from pathlib import Path
sys.path.insert(0, "/work/main/src")
from amnesiac.boot.overlay import OverlayFile, authorized_key, overlay_cpio
out, pub, rest = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
files = [authorized_key(pub)]
for src, dest in zip(rest[::2], rest[1::2]):
    for p in sorted(Path(src).rglob("*")):
        if p.is_file():
            files.append(OverlayFile(f"{dest.strip('/')}/{p.relative_to(src)}", p.read_bytes(), stat.S_IMODE(p.stat().st_mode)))
Path(out).write_bytes(overlay_cpio(files))
print(out, os.path.getsize(out), "bytes,", len(files), "files")
