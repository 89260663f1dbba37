"""Artifacts are folders, written atomically.

Every stage writes into a hidden staging folder beside its output and renames it into place only when it
has finished. An interrupted or failed run therefore leaves either nothing or a folder whose name ends in
``.partial``; never a folder that looks complete. Inputs are only ever read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from edgekit.errors import EdgekitError

# Folders to remove if the process is interrupted: staging folders and scratch space. The CLI's SIGINT handler
# (edgekit.cli.run) removes them and exits at once, because a KeyboardInterrupt raised inside a callback from
# native code (onnxruntime's pybind11 bindings) aborts the whole process instead of unwinding it.
_ACTIVE: list[Path] = []
_COMMITTED: list[Path] = []  # outputs this process renamed into place, complete


def remove_active() -> None:
    for path in list(_ACTIVE):
        shutil.rmtree(path, ignore_errors=True)


def committed_outputs() -> list[Path]:
    """The outputs this process has already put in place, complete: an interrupt that lands after them (while
    the command prints its summary) must say they were kept, not that nothing was written."""
    return list(_COMMITTED)


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


def check_write_path(path: str | os.PathLike, inputs=(), what: str = "output") -> Path:
    """The one guard for every file or folder edgekit writes (``-o``, ``--json``, ``--junit``, ``--markdown``,
    reports): refuse a path equal to or inside an input, one that holds an input, and the current folder or
    any folder above it (``-o . --overwrite`` would replace the folder the user stands in). Returns the
    resolved path. Symlinks are resolved on both sides, so a link cannot smuggle an input in.
    """
    target = Path(path).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise EdgekitError(
            f"the {what} {path} is the current folder or a folder above it, which edgekit will not write over",
            "name a new folder or file below it, e.g. -o ./out",
        )
    for src in inputs:
        if src is None or src == "":
            continue
        s = Path(src).expanduser().resolve()
        relation = ("is that input" if target == s else "is inside it" if s in target.parents
                    else "holds it" if target in s.parents else None)
        if relation is not None:
            raise EdgekitError(
                f"the {what} {path} overlaps the input {src} ({relation}), and edgekit never modifies its input",
                "write it to a separate folder",
            )
    return target


# errno -> (what happened to the path, what to do); the errors of the environment rather than of edgekit.
_DISK_ERRNOS = {
    errno.EROFS: ("is on a read-only file system", "write the output to a writable folder"),
    errno.EACCES: ("is not accessible (permission denied)", "check its permissions, or choose another path"),
    errno.EPERM: ("is not accessible (operation not permitted)", "check its permissions, or choose another path"),
    errno.ENOSPC: ("is on a full disk (no space left on device)", "free some space, or write the output elsewhere"),
    errno.EDQUOT: ("is on a disk whose quota is used up", "free some space, or write the output elsewhere"),
}
_FULL_BYTES = 1 << 20  # below this much free space a failed write is put down to the full disk


def disk_error(e: BaseException, path=None) -> EdgekitError | None:
    """One sentence for an OSError of the file system (read-only, permission, full disk), else None.

    ``path``: the path to name (the output the user gave rather than the hidden temporary file that failed).
    """
    if not isinstance(e, OSError) or e.errno not in _DISK_ERRNOS:
        return None
    problem, fix = _DISK_ERRNOS[e.errno]
    return EdgekitError(f"{path if path is not None else (e.filename or 'a file edgekit writes')} {problem}", fix)


def _disk_full_error(folder: Path, output: Path) -> EdgekitError | None:
    # Libraries wrap a failed write in their own exceptions (torch: RuntimeError "PytorchStreamWriter failed
    # writing file", protobuf, safetensors), losing the errno: a folder with (almost) no space left after
    # the failure is the cause those messages hide.
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_bavail * st.f_frsize >= _FULL_BYTES:
        return None
    problem, fix = _DISK_ERRNOS[errno.ENOSPC]
    return EdgekitError(f"the output {output} {problem}", fix)


def _identity(path: Path):
    """(device, inode) of what is at ``path`` now, None when nothing is: tells "the folder that was there"
    from "a folder somebody else put there since"."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def _rename_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the output's parent folder, held only for the final check-and-rename.

    Why this and not a lock file: the kernel releases a flock when its process dies (SIGKILL, power cut),
    so there is no stale lock to clean up and nothing is left beside the output; and it is held for
    milliseconds, so two runs writing different outputs into one folder do not wait on each other. Two
    edgekit runs finishing into one output therefore check and rename one after the other: the second sees
    the first one's folder (a new inode) and refuses. Other programs do not take the lock; against them
    rename(2) itself is the guard: it fails with ENOTEMPTY rather than replace a folder that holds files.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: rename's own semantics are the only guard
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _changed_meanwhile(output: Path) -> EdgekitError:
    return EdgekitError(
        f"the output {output} was created or replaced by someone else while this run was writing it, "
        "so nothing was replaced and this run's result was discarded",
        "make sure one run writes each output folder, then run again",
    )


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back, then handled (once) by the handler that was in place, when this ends.

    For the few system calls that put an output in place: an interrupt between them would find the old folder
    moved aside and the new one not yet renamed (--overwrite), or the output complete but not yet recorded as
    such (the CLI's handler removes the staging folder, says whether anything complete was written, and exits).
    Done with Python handlers, not the kernel's signal mask: a mask covers one thread, and the interrupt would
    reach the main thread's handler through any other (onnxruntime's pools). Only the main thread can swap
    handlers; elsewhere (the API in a thread of the caller's) there is nothing of edgekit's to defer."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is not None:  # None: a handler set outside Python, which cannot be put back
            previous[signum] = signal.signal(signum, lambda n, frame: caught.append(n))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            signal.raise_signal(caught[0])


def _sweep_old(output: Path) -> None:
    """What a run killed outright (SIGKILL, the out-of-memory killer, a power cut) left beside ``output``: its
    staging folder ``.<name>.<pid>.<random>.partial`` (removed: it never became an output, and a large model's
    can hold gigabytes), and, if it died while replacing the output, the folder it had moved aside,
    ``.<name>.old-<pid>``: put back where it was if nothing replaced it (the kill came between the two renames:
    it is the user's complete previous output), else removed. Only folders of processes that no longer run;
    a running process's are its own business. (By pid: a run in another PID namespace, another container
    writing the same output folder, looks dead from here. A flock held on the staging folder would tell, but
    it deadlocks with the rename lock a nested stage takes on that folder as its parent: compress stages its
    parts inside its own staging folder.)"""
    from psutil import pid_exists

    old_prefix, stage_prefix = f".{output.name}.old-", f".{output.name}."
    try:
        entries = [p for p in output.parent.iterdir() if p.name.startswith(stage_prefix) and p.is_dir()]
    except OSError:
        return
    for p in entries:
        if p.name.startswith(old_prefix):
            pid = p.name[len(old_prefix):]
            if not pid.isdigit() or pid_exists(int(pid)):
                continue
            if not output.exists():
                with contextlib.suppress(OSError):
                    p.rename(output)
                    continue
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.endswith(".partial"):
            # exactly <pid>.<random>: not the staging folder of another output whose name extends this one's
            # (".out.123.<pid>.<random>.partial" belongs to the output "out.123")
            parts = p.name[len(stage_prefix):-len(".partial")].split(".")
            if len(parts) == 2 and parts[0].isdigit() and not pid_exists(int(parts[0])):
                shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staged_output(output: str | os.PathLike, overwrite: bool = False, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces ``output``, on any exception it is removed.

    The final rename happens only if ``output`` is still what it was when the run started: absent, or (an
    empty folder, or any folder with ``overwrite``) the very same folder. Anything else (a folder created
    meanwhile, another run that finished first) stops the run with a user error and deletes nothing but
    this run's own staging folder.
    """
    output = check_write_path(output, protect, "output folder")
    _sweep_old(output)
    check_output_dir(output, overwrite)
    before = _identity(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        # the pid in the name tells a killed run's staging folder from a running one's (_sweep_old)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.{os.getpid()}.", suffix=".partial", dir=output.parent))
    except OSError as e:
        err = disk_error(e, output)
        if err is None:
            raise
        raise err from None
    _ACTIVE.append(staging)
    try:
        # mkdtemp makes the folder private (0700); the output is a folder like any other: mkdir's permissions.
        staging.chmod(0o777 & ~_umask())
        yield staging
        old = None
        with _rename_lock(output.parent), _signals_deferred():
            # No interrupt between the renames and the record that the output is complete: the CLI's handler
            # would otherwise remove the staging folder with the old output moved aside (--overwrite), or say
            # that nothing was written of an output already in place.
            if _identity(output) != before:
                raise _changed_meanwhile(output)
            if before is not None and overwrite:
                # Move the old folder aside first so there is never a moment with a mixed folder.
                old = output.with_name(f".{output.name}.old-{os.getpid()}")
                output.rename(old)
                try:
                    staging.rename(output)
                except BaseException:
                    old.rename(output)  # the output stays what it was
                    raise
                _ACTIVE.append(old)  # an interrupt while it is removed removes the rest
            else:
                # Absent, or an empty folder given without --overwrite: rename(2) replaces an empty folder
                # atomically and fails (ENOTEMPTY/EEXIST) if files appeared in it meanwhile: nothing is lost.
                try:
                    staging.rename(output)
                except OSError as e:
                    if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                        raise _changed_meanwhile(output) from None
                    raise
            _COMMITTED.append(output)
        if old is not None:
            try:
                shutil.rmtree(old, ignore_errors=True)
            finally:
                _ACTIVE.remove(old)
    except BaseException as e:
        err = disk_error(e, output) or (_disk_full_error(output.parent, output)
                                        if isinstance(e, Exception) and not isinstance(e, EdgekitError) else None)
        shutil.rmtree(staging, ignore_errors=True)
        if err is not None:
            raise err from None
        raise
    finally:
        _ACTIVE.remove(staging)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file completely or not at all (a hidden temporary file beside it, then os.replace): a full
    disk or an interrupt never leaves a truncated report that looks complete."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as e:
        err = disk_error(e, path)
        if err is None:
            raise
        raise err from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is for the temporary name, not for the report
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        err = disk_error(e, path)
        if err is not None:
            raise err from None
        raise


def _umask() -> int:
    mask = os.umask(0o77)  # the only way to read it is to set it (briefly to the strictest): put it back
    os.umask(mask)
    return mask


def copy_side_file(src: Path, dst: Path) -> None:
    """Copy a file that travels with an artifact (tokenizer, config) without following a symbolic link: a link
    in an artifact folder would ship whatever it points at (a key, a file outside), so it is refused, named."""
    if Path(src).is_symlink():
        raise EdgekitError(f"{src} is a symbolic link (to {os.readlink(src)}), which edgekit does not follow into "
                           "its output", "replace it with the file itself")
    shutil.copy2(src, dst, follow_symlinks=False)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(f, chunk: int = 1 << 20) -> str:
    """sha256 of a binary file object, read in chunks (hashlib.file_digest is 3.11+)."""
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


# External weights beside an ONNX graph, by the graph's file name plus one of these: model.onnx_data (optimum and
# edgekit write them so), model.onnx.data (onnxruntime-genai's builder).
WEIGHTS_SUFFIXES = ("_data", ".data")
ONNX_FILE_SUFFIXES = (".onnx", *(".onnx" + s for s in WEIGHTS_SUFFIXES))  # a graph or its weights


def model_size(onnx_path: Path) -> int:
    """Bytes of an ONNX model: the graph file and its external weights beside it (WEIGHTS_SUFFIXES)."""
    onnx_path = Path(onnx_path)
    return sum(f.stat().st_size for f in onnx_path.parent.glob(onnx_path.name + "*")
               if f.is_file() and f.name[len(onnx_path.name):] in ("", *WEIGHTS_SUFFIXES))


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
