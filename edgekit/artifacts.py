"""Artifacts are folders, written atomically.

Every stage writes into a hidden staging folder beside its output and renames it into place only when it
has finished. An interrupted or failed run therefore leaves either nothing or a folder whose name ends in
``.partial``; never a folder that looks complete. Inputs are only ever read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from edgekit.errors import EdgekitError

# Folders to remove if the process is interrupted: staging folders and scratch space. The CLI's SIGINT handler
# (edgekit.cli.run) removes them and exits at once, because a KeyboardInterrupt raised inside a callback from
# native code (onnxruntime's pybind11 bindings) aborts the whole process instead of unwinding it.
_ACTIVE: list[Path] = []


def remove_active() -> None:
    for path in list(_ACTIVE):
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def scratch_dir(prefix: str, dir: Path | None = None) -> Iterator[Path]:
    """A temporary folder that is removed on exit, on error and on Ctrl-C."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    _ACTIVE.append(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        _ACTIVE.remove(path)


def check_output_dir(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise EdgekitError(f"the output path {output} exists and is a file", "choose a folder path with -o")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise EdgekitError(
            f"the output folder {output} exists and is not empty",
            "choose another folder with -o, or pass --overwrite to replace it",
        )


@contextlib.contextmanager
def staged_output(output: str | os.PathLike, overwrite: bool = False, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces ``output``, on any exception it is removed."""
    output = Path(output).resolve()
    for src in protect:
        src = Path(src).resolve()
        if output == src or src in output.parents or output in src.parents:
            raise EdgekitError(
                f"the output folder {output} overlaps the input {src}",
                "write the output to a separate folder; edgekit never modifies its input",
            )
    check_output_dir(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    _ACTIVE.append(staging)
    try:
        # mkdtemp makes the folder private (0700); the output is a folder like any other: mkdir's permissions.
        staging.chmod(0o777 & ~_umask())
        yield staging
        if output.exists():
            # --overwrite: move the old folder aside first so there is never a moment with a mixed folder.
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(old)
            staging.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _ACTIVE.remove(staging)


def _umask() -> int:
    mask = os.umask(0o77)  # the only way to read it is to set it (briefly to the strictest): put it back
    os.umask(mask)
    return mask


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(f, chunk: int = 1 << 20) -> str:
    """sha256 of a binary file object, read in chunks (hashlib.file_digest is 3.11+)."""
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


def folder_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


TREE_HASH_METHOD = "sha256 over sorted lines '<relative posix path>\\0<file sha256>\\n' of every file"


def tree_sha256(folder: Path) -> tuple[str, int]:
    """A content hash of a folder (names and bytes, not times); returns (hex digest, file count)."""
    folder = Path(folder)
    files = sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for rel, p in files:
        h.update(f"{rel}\0{sha256_file(p)}\n".encode())
    return h.hexdigest(), len(files)
