"""The one opener for input bytes: every read of a file that came with an input (images, tables, metadata,
weights, the bytes embedded in `_samples.json`) goes through `open_input`.

It refuses, by a short reason that callers put into their own named error:
- a path that leads (through a symlink anywhere on it) outside the folder it belongs to: nothing outside an
  input is ever read, so nothing outside can be quoted in an error or copied into an output;
- anything that is not a regular file: a FIFO or a device (`/dev/zero`) would block or never end;
- a file larger than the caller's bound, before reading it.
"""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path
from typing import BinaryIO


class UnreadableInputError(Exception):
    """A file the opener refuses; `reason` is a short phrase ("not a regular file ..."), `missing` tells a
    file that does not exist apart (some callers report that differently)."""

    def __init__(self, reason: str, *, missing: bool = False, size: int | None = None, strerror: str | None = None):
        super().__init__(reason)
        self.reason, self.missing = reason, missing
        self.size, self.strerror = size, strerror  # of a file refused as too large; the system's words


def resolves_inside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """True when `path` (after following symlinks) is inside `root`."""
    return _is_within(os.path.realpath(root), os.path.realpath(path))


@functools.lru_cache(maxsize=64)
def _real_root(inside: str) -> str:
    """The input folder's real path: resolved once per folder, not once per image (each image path still is)."""
    return os.path.realpath(inside)


def _is_within(real_root: str, real: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def open_input(path: str | os.PathLike, *, inside: str | os.PathLike | None, max_bytes: int | None) -> BinaryIO:
    """`path` opened for binary reading, or UnreadableInputError.

    `inside`: the input folder the file must resolve into (None: the caller named the file itself, e.g. a
    command-line argument). `max_bytes`: the largest size accepted (None: the caller streams and bounds each
    piece it reads, e.g. line by line)."""
    target = os.fspath(path)
    if inside is not None:
        target = os.path.realpath(target)  # opened as resolved, so a link swapped in afterwards is not followed
        if not _is_within(_real_root(os.path.abspath(inside)), target):  # absolute: a chdir cannot alias it
            raise UnreadableInputError("the path (or a symlink on it) leads outside the input folder")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)  # a FIFO: no wait for a writer
    if inside is not None:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(target, flags)
    except FileNotFoundError:
        raise UnreadableInputError("file not found", missing=True) from None
    except PermissionError as exc:
        raise UnreadableInputError("permission denied", strerror=exc.strerror) from None
    except OSError as exc:
        raise UnreadableInputError(f"cannot be read ({exc.strerror or exc})", strerror=exc.strerror or str(exc)) \
            from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableInputError("not a regular file (a pipe, device or folder)")
        if max_bytes is not None and info.st_size > max_bytes:
            raise UnreadableInputError(f"{info.st_size} bytes, more than the {max_bytes} allowed", size=info.st_size)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_input(path: str | os.PathLike, *, inside: str | os.PathLike | None, max_bytes: int) -> bytes:
    """The whole file through `open_input`, at most `max_bytes` (also when it grows while read)."""
    with open_input(path, inside=inside, max_bytes=max_bytes) as handle:
        try:
            data = handle.read(max_bytes + 1)
        except OSError as exc:
            raise UnreadableInputError(f"cannot be read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise UnreadableInputError(f"grew past the {max_bytes} bytes allowed while it was read", size=len(data))
    return data


def parent_of(path: str | os.PathLike) -> Path:
    """The folder a metadata file lies in: the default `inside` of legacy_format's readers."""
    return Path(os.path.abspath(path)).parent
