"""Archives that come with a model (voices.tgz, dist.tgz), unpacked once and safely.

An archive is unpacked into the cache once per content (a folder named by its digest):
checked whole as it streams (member names, types, sizes, count, and the inflated bytes,
so a gzip bomb costs no memory) into a temporary folder that is renamed into place, so
a refused archive leaves nothing behind.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import UserError


@dataclass(frozen=True)
class Limits:
    members: int
    member_bytes: int
    total_bytes: int


def cache_dir(kind: str) -> Path:
    base = os.environ.get("PERSONAPLEX_FAST_CACHE") or Path.home() / ".cache" / "personaplex_fast"
    return Path(base) / kind


def unpack(archive: Path, into: Path, what: str, keep, limits: Limits) -> Path:
    """Extract `archive` into `into`/<digest> (once per content); returns that folder.
    keep(member path) -> the path to write it under (relative), or None to skip it.
    `what` names the archive's kind in errors ("voices", "client bundle")."""
    digest = _digest(archive)
    dest = into / digest
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=dest.parent))
    try:
        _extract(archive, tmp, what, keep, limits)
        (tmp / ".complete").write_text("")
        if dest.exists():  # left half-written by an older version, or unpacked meanwhile
            if (dest / ".complete").exists():
                return dest
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except OSError as e:
        raise UserError(f"{archive}: cannot unpack {what} into {dest.parent} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _digest(archive: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(archive, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise UserError(f"{archive}: cannot read ({e.strerror})") from None
    return h.hexdigest()[:16]


class _Bounded(io.RawIOBase):
    """The inflated archive stream, refused past the limit (tar headers included:
    tarfile reads long-name records into memory whole)."""

    def __init__(self, f, archive: Path, what: str, limits: Limits):
        self.f, self.archive, self.what, self.limits = f, archive, what, limits
        self.left = limits.total_bytes + 1024 * limits.members

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.left -= n
        if self.left < 0:
            raise UserError(f"{self.archive}: unpacks to more than {self.limits.total_bytes >> 20} MB; "
                            f"not a {self.what} archive")
        return n


def _extract(archive: Path, dest: Path, what: str, keep, limits: Limits) -> None:
    total = 0
    try:
        with gzip.open(archive) as gz, tarfile.open(fileobj=_Bounded(gz, archive, what, limits), mode="r|") as tar:
            for count, member in enumerate(tar, 1):
                name = PurePosixPath(member.name)
                total += member.size
                if count > limits.members or total > limits.total_bytes:
                    raise UserError(f"{archive}: more than {limits.members} members or "
                                    f"{limits.total_bytes >> 20} MB; not a {what} archive")
                if member.isdir():
                    continue
                if not member.isfile() or name.is_absolute() or ".." in name.parts:
                    raise UserError(f"{archive}: refusing unsafe archive member {member.name!r}")
                out = keep(name)
                if out is None:
                    continue
                if member.size > limits.member_bytes:
                    raise UserError(f"{archive}: member {member.name!r} has {member.size >> 20} MB; "
                                    f"a member of a {what} archive is at most {limits.member_bytes >> 20} MB")
                target = dest / out
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as f:
                    shutil.copyfileobj(src, f)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise UserError(f"{archive}: cannot unpack {what} ({e})") from None
