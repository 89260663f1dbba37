"""Reading release tarballs safely: a tarball is refused when extracting it could give anything else than what
was verified."""

from __future__ import annotations

import os
import posixpath
import tarfile
from pathlib import PurePosixPath

from edgekit.errors import EdgekitError

REBUILD = "a release tarball holds only plain files and folders: rebuild it with `edgekit release build` or download it again"


def safe_members(tar: tarfile.TarFile, path) -> list[tarfile.TarInfo]:
    """The members of a release tarball, refused (exit 2, naming the member) when extracting them could give
    anything but the plain files and folders that were verified: a link, a device or fifo, an absolute or
    ``..`` path, or two members of one name (``tar x`` lets the later silently replace the earlier, so what was
    hashed is not what lands on disk). tarfile's ``data`` filter (PEP 706) judges each member as an extraction
    would; the absolute-path, link and duplicate checks are ours, because the filter makes absolute names
    relative, allows links inside the destination, and sees one member at a time."""
    seen: dict[str, str] = {}
    dest = os.path.join(os.path.sep, "edgekit-extraction-check")  # only used to compute paths, never written
    members = tar.getmembers()
    for m in members:
        name = m.name
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
            raise EdgekitError(f"{path} holds the member {name!r} with an absolute path", REBUILD)
        if ".." in PurePosixPath(name).parts or ".." in name.split("\\"):
            raise EdgekitError(f"{path} holds the member {name!r} with a '..' component", REBUILD)
        if m.issym() or m.islnk():
            kind = "symbolic" if m.issym() else "hard"
            raise EdgekitError(f"{path} holds the member {name!r}, a {kind} link to {m.linkname!r}", REBUILD)
        if not (m.isfile() or m.isdir()):
            kind = "device" if m.ischr() or m.isblk() else "fifo" if m.isfifo() else "special file"
            raise EdgekitError(f"{path} holds the member {name!r}, a {kind}", REBUILD)
        try:
            tarfile.data_filter(m, dest)
        except tarfile.FilterError as e:
            raise EdgekitError(f"{path} holds the member {name!r}, which extraction would refuse ({e})", REBUILD) from None
        key = posixpath.normpath(name.replace("\\", "/")).casefold()  # case-insensitive filesystems merge these
        if key in seen:
            raise EdgekitError(f"{path} holds the member {name!r} twice (also as {seen[key]!r}), so extracting it "
                               "gives something else than what is verified", REBUILD)
        seen[key] = name
    return members
