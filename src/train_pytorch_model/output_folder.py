"""Output folders: every command's result appears whole or not at all, never over anything a user has.

The protocol, shared by train, score, convert, evaluate, export and init-model:

- `check_output_folder` (before any work): refuse an output that is a file, not empty, not writable,
  inside or around an input, or being written by another run; then hold the output's lock.
- `staged_output` (at the end): write into a hidden staging folder, publish it onto the output
  (a rename; entry by entry, journaled, into a mount point), release the lock.
- `unfinished_publication`: what readers ask before taking a folder for a result.
- `release_output`: give the lock up early (a command that stops before writing).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import OutputDirectoryError, quote
from .legacy_format import META_FILE

log = logging.getLogger(__name__)

STAGE_PREFIX = ".partial-"  # our own hidden names inside an output: staging folders, files being copied in
# Written into the output before entries move in one by one, removed once all are in: a folder holding it was
# being published by us when the run died, and the entries it lists are ours to remove.
JOURNAL = f"{STAGE_PREFIX}publication.json"
JOURNAL_SIGNATURE = "train_pytorch_model publication"
LOCK_SIGNATURE = b"train_pytorch_model output lock\n"  # a `.<out>.lock` we created (and may delete)
MARKERS = (META_FILE, "MLmodel")  # what readers look for first: published last
# Write failures that are the file system's answer, not a bug: a named error, not UnexpectedError.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO, errno.EACCES, errno.EPERM}


def overlap(path: str | os.PathLike, folder: str | os.PathLike) -> str | None:
    """How `path` sits against `folder` ("is", "is inside", "holds"), after resolving `..` and links; None: apart."""
    path, folder = _real(path), _real(folder)
    if path == folder:
        return "is"
    if folder in path.parents:
        return "is inside"
    if path in folder.parents:
        return "holds"
    return None


def check_output_folder(out: str | os.PathLike, *, inputs) -> None:
    """Refuse, before any work is done, an output that is a file, a non-empty folder, not writable, inside
    (or holding, or equal to) one of the `inputs` (folders or files; None entries are skipped), or being written
    by another run; then hold the output's lock until `staged_output` has written it (or the process ends).

    The rule: the output folder must be new or empty (what an interrupted run of ours left aside), so a
    result is never mixed with an earlier one and nothing a user had there is overwritten. Every command
    names its inputs (the keyword is required): an output inside one would change, or become part of, it.
    Paths are compared after resolving `..` and links: `out/existing/new/..` is `out/existing`.
    """
    given, out = out, _real(out)
    for folder in inputs:
        where = overlap(out, folder) if folder is not None else None
        if where:
            kind = "input file" if os.path.isfile(folder) else "input folder"
            raise OutputDirectoryError(
                f"Output folder '{given}' {where} the {kind} '{folder}': the result would mix with (or become "
                "part of) the input. Give an output folder outside every input."
            )
    _check_new_or_empty(out, given)
    if out not in _LOCKS:
        _LOCKS[out] = _OutputLock(out, given)
        _check_new_or_empty(out, given)  # again: another run may have finished just before we got the lock


@contextlib.contextmanager
def reserved_output(out: str | os.PathLike, *, inputs):
    """Every command's first step: `check_output_folder` against its inputs, before any work; the lock is given
    up however the command ends (`staged_output` inside writes the result)."""
    check_output_folder(out, inputs=inputs)
    try:
        yield
    finally:
        release_output(out)


def release_output(out: str | os.PathLike) -> None:
    """Give up the output's lock (staged_output does it when done; a command that stops early may call it)."""
    lock = _LOCKS.pop(_real(out), None)
    if lock is not None:
        lock.release()


def unfinished_publication(folder: str | os.PathLike) -> bool:
    """Whether `folder` is an output we were moving entries into when the run died, before its markers arrived:
    not a result (readers refuse it); the same command again replaces it."""
    folder = Path(folder)
    return os.path.lexists(folder / JOURNAL) and not os.path.lexists(folder / META_FILE)


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _leftovers(out: Path) -> set[str]:
    """Names in `out` that an interrupted run of ours left: staging folders, files being copied in, and the
    entries its publication journal lists."""
    names = set()
    journal = out / JOURNAL
    if os.path.lexists(journal):
        names |= set(_journal_entries(journal))
    return names | {name for name in os.listdir(out) if name.startswith(STAGE_PREFIX)}


def _journal_entries(journal: Path) -> list[str]:
    """The entry names our journal lists; none when it is not ours (then nothing it names is touched)."""
    try:
        if not journal.is_file() or journal.is_symlink() or journal.stat().st_size > 2**20:
            return []
        content = json.loads(journal.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(content, dict) or content.get("written_by") != JOURNAL_SIGNATURE \
            or not isinstance(content.get("entries"), list):
        return []
    return [name for name in content["entries"]
            if isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _check_new_or_empty(out: Path, given) -> None:
    if out.exists():
        if not out.is_dir():
            raise OutputDirectoryError(f"Output path '{given}' is a file; give a folder (new or empty).")
        try:
            foreign = set(os.listdir(out)) - _leftovers(out)
        except OSError as exc:
            raise OutputDirectoryError(f"Output folder '{given}' cannot be read: {exc.strerror or exc}.") from None
        if foreign:
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
    hidden `.<name>.lock` file beside it. Held by this process only. The lock file is removed on release only
    when we created it (it holds our signature): a user's own file of that name is locked, never changed."""

    def __init__(self, out: Path, given):
        self.lock_file = None
        try:
            if out.is_dir():
                self.fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                self.fd, self.lock_file = self._open_lock_file(out.parent / f".{out.name}.lock")
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

    @staticmethod
    def _open_lock_file(path: Path) -> tuple[int, Path | None]:
        """The lock file's descriptor, and its path when it is ours to remove."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            os.write(fd, LOCK_SIGNATURE)
            return fd, path
        except FileExistsError:  # ours, left by a killed run, or a user's: locked through a read-only descriptor
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            ours = stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, 64, 0) == LOCK_SIGNATURE
            return fd, path if ours else None

    def release(self) -> None:
        if self.lock_file is not None:  # removed while still locked: nobody locks a file that is going away
            with contextlib.suppress(OSError):
                self.lock_file.unlink(missing_ok=True)
        os.close(self.fd)


_LOCKS: dict[Path, _OutputLock] = {}
atexit.register(lambda: [release_output(out) for out in list(_LOCKS)])


class staged_output:
    """Write a whole output folder or nothing.

    Files go to a hidden staging folder: beside `out`, renamed onto it at the end (rename over an
    empty folder is atomic on POSIX); or, where `out` is a mount point (Azure ML) or its parent is not
    writable, inside `out`, whose entries then move in one by one. Those moves are journaled
    (`JOURNAL` first, removed last), `_meta.yaml`/`MLmodel` move last, and an entry that has to cross
    file systems is copied under a hidden name and renamed into place: a reader never sees a marker
    without the rest, nor a half-copied file under its name. A run killed meanwhile leaves a folder
    that readers refuse and that the same command again clears (only what the journal lists) and
    writes anew; any other failure (SIGTERM included) takes back what was moved in. On error (a full
    disk: OutputDirectoryError) the staging folder is removed. The output's lock is held throughout
    and released at the end.
    """

    def __init__(self, out: str | os.PathLike, *, inputs=()):
        self.given, self.out, self.inputs = out, _real(out), tuple(inputs)

    def __enter__(self) -> Path:
        out = self.out
        check_output_folder(out, inputs=self.inputs)
        if out.is_dir():
            for name in _leftovers(out):  # what an interrupted run of ours left (we hold the lock)
                _remove(out / name)
        self.stage = None
        if not os.path.ismount(out):  # a mount point cannot be replaced: staged inside, moving in is a rename
            with contextlib.suppress(OSError):  # parent not writable: staged inside too
                out.parent.mkdir(parents=True, exist_ok=True)
                self.stage = _make_stage(out.parent, f".{out.name}.partial-")
        if self.stage is None:
            try:
                out.mkdir(parents=True, exist_ok=True)
                self.stage = _make_stage(out, STAGE_PREFIX)
            except OSError as exc:
                release_output(out)
                raise OutputDirectoryError(
                    f"Output folder '{self.given}' is not writable: {exc.strerror or exc}.") from None
        return self.stage

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None:
                shutil.rmtree(self.stage, ignore_errors=True)
                reason = write_failure(exc)
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
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and set(os.listdir(self.out)) - {JOURNAL}:
                        raise OutputDirectoryError(
                            f"Output folder '{self.given}' was written by someone else meanwhile; nothing of this "
                            "run was added to it. Give each run its own output folder."
                        ) from None
                    self.out.mkdir(parents=True, exist_ok=True)  # a mount point: cannot be replaced
            self._move_entries_in()
        except OSError as exc:
            reason = write_failure(exc) or exc.strerror or str(exc)
            raise OutputDirectoryError(
                f"Failed to write output folder '{self.given}': {reason}. Nothing was written; run again.") from None
        finally:
            shutil.rmtree(self.stage, ignore_errors=True)

    def _move_entries_in(self) -> None:
        entries = sorted(self.stage.iterdir(), key=lambda p: p.name in MARKERS)
        taken = [p.name for p in entries if os.path.lexists(self.out / p.name)]
        if taken:  # never merge into, or overwrite, what is there
            raise OutputDirectoryError(
                f"Output folder '{self.given}' already has {quote(taken[:3])} from someone else; nothing of this "
                "run was added. Give each run its own output folder."
            )
        journal = self.out / JOURNAL
        _write_durably(journal, json.dumps({"written_by": JOURNAL_SIGNATURE, "entries": [p.name for p in entries]}))
        try:
            for entry in entries:
                _move_in(entry, self.out / entry.name)
            _fsync_folder(self.out)  # the entries are in before the journal says so
            journal.unlink()
        except BaseException:  # SIGTERM, a full disk...: take back what was moved in (none was there), then the journal
            for entry in entries:
                _remove(self.out / entry.name)
                _remove(self.out / f"{STAGE_PREFIX}{entry.name}")
            with contextlib.suppress(OSError):
                journal.unlink()
            raise


def _move_in(source: Path, target: Path) -> None:
    """A rename; across file systems a copy under a hidden name, renamed into place once complete."""
    try:
        os.rename(source, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    copying = target.with_name(f"{STAGE_PREFIX}{target.name}")
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, copying, symlinks=True)
    else:
        shutil.copy2(source, copying, follow_symlinks=False)
    os.rename(copying, target)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "x", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system can sync a folder
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_failure(exc: BaseException) -> str | None:
    """What a failed write means to the user (disk full, quota, read-only...), or None if it is no write failure."""
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return exc.strerror or str(exc)
    # torch.save reports the C++ writer's failure as a RuntimeError without the errno.
    if isinstance(exc, RuntimeError) and any(m in str(exc) for m in ("PytorchStreamWriter", "inline_container",
                                                                       "file write failed", "unexpected pos")):
        return "the file system refused a write (disk full, quota exceeded, file too large or read-only)"
    return None


def _make_stage(folder: Path, prefix: str) -> Path:
    stage = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    umask = os.umask(0)  # mkdtemp makes 0700 folders; the output gets the usual permissions (umask applied)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)
    return stage
