"""Which model files were already checked against their sha256, so a later load hashes only what changed.

Hashing every file on every load costs seconds per gigabyte (38 s for the float32 1.6 B model on a
2-core VM). A file whose sha256 matched is remembered by its path, size, modification time, inode and
device in the user's cache directory (`$DIA_ORT_CACHE`, else `~/.cache/dia_ort`), never in the model
folder, which may be read-only. A file with any of those changed is hashed again, and refused if its
content changed. Set `DIA_ORT_VERIFY=always` to hash every time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

RECORD_NAME = "verified-files.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The user's dia-ort cache: `cache_dir`, else `$DIA_ORT_CACHE`, else `~/.cache/dia_ort`."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("DIA_ORT_CACHE", Path.home() / ".cache" / "dia_ort"))


def sha256_of(path: Path) -> str:
    """The file's sha256, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def has_sha256(path: Path, sha256: str) -> bool:
    """Whether the file's content has `sha256`: remembered when the file is unchanged since it last
    matched, else hashed now (and remembered when it matches)."""
    stat = path.stat()
    key = str(path.resolve())
    # ctime too: `cp -p`, `rsync -t` or `tar x` can put a modification time back, nothing can set ctime
    fingerprint = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]
    always = os.environ.get("DIA_ORT_VERIFY") == "always"
    records = {} if always else _read()
    if records.get(key) == {"fingerprint": fingerprint, "sha256": sha256}:
        return True
    if sha256_of(path) != sha256:
        return False
    if not always:
        records[key] = {"fingerprint": fingerprint, "sha256": sha256}
        _write(records)
    return True


def _record_path() -> Path:
    return cache_root() / RECORD_NAME


def _read() -> dict:
    try:
        records = json.loads(_record_path().read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def _write(records: dict) -> None:
    """Replace the record whole (a reader never sees half of it); a cache that cannot be written is
    only a slower next load."""
    path = _record_path()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".verified-", delete=False) as tmp:
            json.dump(records, tmp)
        os.replace(tmp.name, path)
    except OSError as exc:
        log.debug("cannot record verified files in %s: %s", path, exc)
        if tmp is not None:
            Path(tmp.name).unlink(missing_ok=True)
