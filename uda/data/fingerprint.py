"""A dataset root's fingerprint: a digest of its file list (relative names and sizes).

Runs log it as the digest of their dataset inputs, so that the embedded ACDC
and a real ACDC later put at the same path are two datasets, while two
identical copies at different paths are one. Only the listing is read
(``os.scandir`` and one stat per file, no file content, no mtimes, which a
copy does not keep), so the tens of thousands of files of a real Cityscapes
or ACDC take a fraction of a second.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

__all__ = ["DIGEST_LENGTH", "file_list_digest"]

#: Hex characters kept, as MLflow recommends for dataset digests (at most 10).
DIGEST_LENGTH = 10


def file_list_digest(root: os.PathLike | str) -> str:
    """The digest of every file under ``root``: its path relative to ``root`` and its size.

    Symbolic links are followed, as the readers follow them (a dataset's
    folders are often links to another disk); a folder reached a second time
    (a link loop) is listed once. A folder that cannot be listed, or a broken
    link, counts as an entry of its own, so the digest is still stable.

    Args:
        root: A dataset folder. A missing one has the digest of an empty list.

    Returns:
        ``DIGEST_LENGTH`` hex characters of a SHA-256.
    """
    digest = hashlib.sha256()
    seen: set[tuple[int, int]] = set()
    # Depth first, each folder's entries sorted by name: one order for one tree, whatever
    # order the file system lists them in.
    pending: list[tuple[str, str]] = [(os.fspath(Path(root)), "")]
    while pending:
        folder, prefix = pending.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except FileNotFoundError:
            if prefix:  # a folder vanished while listed; the root itself may be absent
                _add(digest, prefix, "gone")
            continue
        except OSError:
            _add(digest, prefix, "unreadable")
            continue
        folders = []
        for entry in entries:
            relative = prefix + entry.name
            try:
                mode = entry.stat().st_mode  # follows links; cached from scandir where it can be
                if stat.S_ISDIR(mode):
                    folders.append((entry.path, relative + "/"))
                else:
                    _add(digest, relative, str(entry.stat().st_size))
            except OSError:  # a broken link, or a file removed meanwhile
                _add(digest, relative, "unreadable")
        pending.extend(reversed(folders))  # popped in name order
    return digest.hexdigest()[:DIGEST_LENGTH]


def _add(digest, relative: str, what: str) -> None:
    # NUL separates: it is the one character no file name holds.
    digest.update(os.fsencode(relative) + b"\0" + what.encode() + b"\0")
