"""Output folders: every command's result appears whole or not at all, never over anything a user has.

The protocol, shared by train, score, convert, evaluate, export and init-model:

- `check_output_folder` (before any work): refuse an output that is a file, not empty, not writable,
  inside or around an input, or being written by another run; then hold the output's lock.
- `staged_output` (at the end): write into a hidden staging folder, publish it onto the output
  (a rename; entry by entry into a mount point), release the lock.
- `release_output`: give the lock up early (a command that stops before writing).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputDirectoryError, quote
from .legacy_format import META_FILE

log = logging.getLogger(__name__)

STAGE_PREFIX = ".partial-"  # staging folders made inside a mounted output folder
# Write failures that are the file system's answer, not a bug: a named error, not UnexpectedError.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO, errno.EACCES, errno.EPERM}


def check_output_folder(out: str | os.PathLike, inputs: tuple = ()) -> None:
    """Refuse, before any work is done, an output that is a file, a non-empty folder, not writable, inside
    (or holding, or equal to) one of the `inputs` folders, or being written by another run; then hold the
    output's lock until `staged_output` has written it (or the process ends).

    The rule: the output folder must be new or empty (our own leftover staging folders aside),
    so a result is never mixed with an earlier one and nothing a user had there is overwritten.
    Paths are compared after resolving `..` and links: `out/existing/new/..` is `out/existing`.
    """
    given, out = out, _real(out)
    for folder in inputs:
        if folder is None:
            continue
        real = _real(folder)
        if out == real or real in out.parents or out in real.parents:
            where = "is" if out == real else "is inside" if real in out.parents else "holds"
            raise OutputDirectoryError(
                f"Output folder '{given}' {where} the input folder '{folder}': the result would mix with (or become "
                "part of) the input. Give an output folder outside every input."
            )
    _check_new_or_empty(out, given)
    if out not in _LOCKS:
        _LOCKS[out] = _OutputLock(out, given)
        _check_new_or_empty(out, given)  # again: another run may have finished just before we got the lock


def release_output(out: str | os.PathLike) -> None:
    """Give up the output's lock (staged_output does it when done; a command that stops early may call it)."""
    lock = _LOCKS.pop(_real(out), None)
    if lock is not None:
        lock.release()


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _check_new_or_empty(out: Path, given) -> None:
    if out.exists():
        if not out.is_dir():
            raise OutputDirectoryError(f"Output path '{given}' is a file; give a folder (new or empty).")
        try:
            names = [entry.name for entry in out.iterdir()]
        except OSError as exc:
            raise OutputDirectoryError(f"Output folder '{given}' cannot be read: {exc.strerror or exc}.") from None
        if any(not name.startswith(STAGE_PREFIX) for name in names):
            raise OutputDirectoryError(
                f"Output folder '{given}' is not empty; give a new or empty folder so no earlier result is mixed in."
            )
        problem = _write_problem(out)
        if problem:
            raise OutputDirectoryError(
                f"Output folder '{given}' is not writable ({problem}). Give a folder you can write to.")
        return
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputDirectoryError(f"Output folder '{given}' cannot be created: '{ancestor}' is a file, not a folder.")
    problem = _write_problem(ancestor)
    if problem:
        raise OutputDirectoryError(
            f"Output folder '{given}' cannot be created: '{ancestor}' is not writable ({problem}). "
            "Give a folder you can write to."
        )


def _write_problem(folder: Path) -> str | None:
    """Why nothing can be created in `folder`, or None. Tried for real: os.access ignores ACLs, mounts, capabilities."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=folder))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


class _OutputLock:
    """An exclusive flock: on the output folder itself when it exists (an Azure ML mount point), else on a
    hidden `.<name>.lock` file beside it, removed on release. Held by this process only."""

    def __init__(self, out: Path, given):
        self.lock_file = None
        try:
            if out.is_dir():
                self.fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                self.lock_file = out.parent / f".{out.name}.lock"
                self.fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputDirectoryError(f"Output folder '{given}' cannot be locked: {exc.strerror or exc}.") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise OutputDirectoryError(
                f"Output folder '{given}' is being written by another run right now. Give each run its own "
                "output folder."
            ) from None
        except OSError as exc:  # a file system without locks (some network mounts): the final rename still guards
            log.warning("Output folder %s cannot be locked (%s); make sure no other run writes it.",
                        given, exc.strerror or exc)

    def release(self) -> None:
        if self.lock_file is not None:
            try:
                self.lock_file.unlink(missing_ok=True)
            except OSError:
                pass
        os.close(self.fd)


_LOCKS: dict[Path, _OutputLock] = {}
atexit.register(lambda: [release_output(out) for out in list(_LOCKS)])


class staged_output:
    """Write a whole output folder or nothing.

    Files go to a hidden sibling staging folder, which is renamed onto `out` at the end
    (rename over an empty folder is atomic on POSIX). Where that is impossible (`out` is a mount
    point, as in Azure ML), entries are moved in one by one with `_meta.yaml`/`MLmodel` last, so a
    reader never sees them without the rest. On error (a full disk included: OutputDirectoryError)
    the staging folder is removed. The output's lock is held throughout and released at the end.
    """

    MARKERS = (META_FILE, "MLmodel")

    def __init__(self, out: str | os.PathLike, inputs: tuple = ()):
        self.given, self.out, self.inputs = out, _real(out), inputs

    def __enter__(self) -> Path:
        out = self.out
        check_output_folder(out, self.inputs)
        if out.is_dir():
            for stale in out.glob(f"{STAGE_PREFIX}*"):  # left inside by a killed run (mounted output)
                shutil.rmtree(stale, ignore_errors=True)
        parent = out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
            _chmod_like_mkdir(self.stage)
        except OSError:
            try:  # parent not writable (a mounted output): stage inside the output itself
                out.mkdir(parents=True, exist_ok=True)
                self.stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=out))
                _chmod_like_mkdir(self.stage)
            except OSError as exc:
                release_output(out)
                raise OutputDirectoryError(
                    f"Output folder '{self.given}' is not writable: {exc.strerror or exc}.") from None
        return self.stage

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None:
                shutil.rmtree(self.stage, ignore_errors=True)
                reason = _write_failure(exc)
                if reason:
                    raise OutputDirectoryError(
                        f"Writing output folder '{self.given}' failed: {reason}. Nothing was written; free space (or "
                        "quota) or choose a writable location, then run again."
                    ) from None
                return False
            self._publish()
            return False
        finally:
            release_output(self.out)

    def _publish(self) -> None:
        try:
            if self.stage.parent != self.out:
                try:
                    os.replace(self.stage, self.out)  # atomic when `out` is absent or an empty folder
                    return
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and any(
                            not p.name.startswith(STAGE_PREFIX) for p in self.out.iterdir()):
                        raise OutputDirectoryError(
                            f"Output folder '{self.given}' was written by someone else meanwhile; nothing of this "
                            "run was added to it. Give each run its own output folder."
                        ) from None
                    self.out.mkdir(parents=True, exist_ok=True)  # a mount point: cannot be replaced
            entries = sorted(self.stage.iterdir(), key=lambda p: p.name in self.MARKERS)
            taken = [p.name for p in entries if os.path.lexists(self.out / p.name)]
            if taken:  # never merge into, or overwrite, what is there
                raise OutputDirectoryError(
                    f"Output folder '{self.given}' already has {quote(taken[:3])} from someone else; nothing of this "
                    "run was added. Give each run its own output folder."
                )
            for entry in entries:
                shutil.move(entry, self.out / entry.name)  # a rename, or a copy across file systems
            self.stage.rmdir()
        except OSError as exc:
            raise OutputDirectoryError(
                f"Failed to write output folder '{self.given}': {exc.strerror or exc}.") from None
        finally:
            shutil.rmtree(self.stage, ignore_errors=True)


def _write_failure(exc: BaseException) -> str | None:
    """What a failed write means to the user (disk full, quota, read-only...), or None if it is no write failure."""
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return exc.strerror or str(exc)
    # torch.save reports the C++ writer's failure as a RuntimeError without the errno.
    if isinstance(exc, RuntimeError) and any(m in str(exc) for m in ("PytorchStreamWriter", "inline_container",
                                                                       "file write failed")):
        return "the file system refused a write (disk full, quota exceeded, file too large or read-only)"
    return None


def _chmod_like_mkdir(path: Path) -> None:
    """mkdtemp makes 0700 folders; the output should get the usual permissions (umask applied)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
