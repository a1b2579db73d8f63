"""Writing files from untrusted containers safely: validated names, atomic writes, clean-up on signals.

Every writer of the compression tools goes through here, so the rules hold in one place:
- `safe_relpath` refuses any name read from a file that could leave the target folder or mean something else on
  another OS (absolute, `..`, drive or device names, NUL and control characters, over-long names);
- `AtomicFile` writes a file under a hidden temporary name beside it and renames it into place only on `commit()`;
- `StagedDir` builds a folder's files in a hidden staging folder and moves them in only once all of them are complete,
  refusing to follow a symlink out of the target;
- `terminate_cleanly` turns SIGTERM/SIGHUP (default action: die on the spot, leaving temporary files) into an
  exception while a write is in flight, so the `finally` clean-ups run, then hands the signal on as before.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TypeVar

MAX_NAME_BYTES = 1024  # a whole relative name
MAX_PART_BYTES = 255  # one path component (NAME_MAX of common file systems)
_WINDOWS_DEVICES = re.compile(r"^(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³]|conin\$|conout\$)(\..*)?$",
                              re.IGNORECASE)
_TERMINATING = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)
# OSErrors a write can raise without naming a file (ENOSPC from write()): reported against the file being written
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


T = TypeVar("T")


class UnsafeNameError(ValueError):
    """A name read from a container that must not be used as a path."""


class Interrupted(KeyboardInterrupt):
    """A terminating signal arrived while a write was in flight (a KeyboardInterrupt, so `except Exception` lets it
    through and Lightning shuts down as for Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def safe_relpath(name: object, what: str = "record") -> PurePosixPath:
    """`name` as a relative POSIX path that stays inside any folder it is joined to, or UnsafeNameError naming it."""
    if not isinstance(name, str):
        raise UnsafeNameError(f"{what} name {name!r} is not a string")
    shown = repr(name[:80]) + ("..." if len(name) > 80 else "")

    def bad(why: str) -> UnsafeNameError:
        return UnsafeNameError(f"{what} {shown}: unsafe file name ({why}); refusing to write it")

    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise bad("not valid Unicode") from None
    if not name:
        raise bad("empty")
    if size > MAX_NAME_BYTES:
        raise bad(f"{size} bytes, more than {MAX_NAME_BYTES}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise bad("NUL or control character")
    if "\\" in name or ":" in name:
        raise bad("backslash or colon: a Windows path, drive or stream")
    if name.startswith("/"):
        raise bad("absolute path")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise bad("empty, '.' or '..' component")
        if len(part.encode("utf-8")) > MAX_PART_BYTES:
            raise bad(f"a component longer than {MAX_PART_BYTES} bytes")
        if part[-1] in ". " or _WINDOWS_DEVICES.match(part):
            raise bad("a device name or a component ending in a dot or space")
    return PurePosixPath(*parts)


def check_record_name(name: object, what: str = "tensor", limit: int = 64 * 1024) -> str:
    """A non-path name (a tensor's): a string without NUL, of bounded length."""
    if not isinstance(name, str) or "\0" in name or len(name) > limit:
        raise UnsafeNameError(f"{what} name {str(name)[:80]!r} is not a valid name")
    return name


def _is_real_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink()


def write_error(e: OSError, path: Path, doing: str = "write") -> OSError:
    """The same OSError, naming the file the user asked for instead of a hidden temporary one."""
    err = type(e)(e.errno, f"cannot {doing} {path}: {e.strerror or e}")
    err.filename = None
    return err


def _new_file(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)


def fresh_entry(parent: Path, prefix: str, suffix: str, make: Callable[[Path], T]) -> tuple[Path, T]:
    """A new hidden temporary file or folder in `parent`, made by make(path) with the default permissions (umask
    applied), unlike tempfile's 0600 files and 0700 folders, which would become the output's permissions."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            return path, make(path)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name in {parent}")


@contextmanager
def terminate_cleanly(handlers_too: bool = False) -> Iterator[None]:
    """Run the block with SIGTERM/SIGHUP raising `Interrupted`, so clean-ups run; afterwards the signal is handed to
    the handler there before (the default one ends the process, now without leftovers).

    Only signals still at their default action are taken, so a handler someone installed (Lightning's SIGTERM notice)
    keeps working and the write finishes; `handlers_too` (a CLI's main) takes every signal not ignored and does not
    hand it on: the caller reports the `Interrupted`. Only the main thread can handle signals: elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        fired.append(signum)
        if len(fired) == 1:  # one exception only: a second signal must not interrupt the clean-up of the first
            raise Interrupted(signum)

    previous = {}
    for s in _TERMINATING:
        h = signal.getsignal(s)
        if h == signal.SIG_DFL or (handlers_too and h not in (signal.SIG_IGN, None)):
            previous[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if fired and not handlers_too:
            signal.raise_signal(fired[0])


class AtomicFile:
    """A file written under a hidden temporary name in the target's folder and renamed onto it by `commit()`;
    `discard()` (or leaving the `with` block by an exception, Ctrl-C or SIGTERM) removes it. The target is never
    partly written."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(errno.EISDIR, f"{self.path} is a directory; give a file name to write")
        parent = self.path.parent
        if not parent.is_dir():
            raise FileNotFoundError(errno.ENOENT, f"cannot write {self.path}: folder {parent} does not exist")
        self._guard = terminate_cleanly()
        self._guard.__enter__()
        self.tmp: Path | None = None
        with self._discard_on_error():
            self.tmp, fd = fresh_entry(parent, f".{self.path.name[:100]}.", ".partial", _new_file)
            self.f: BinaryIO = os.fdopen(fd, "wb")
        self.done = False

    @contextmanager
    def _discard_on_error(self) -> Iterator[None]:
        """Remove the temporary file on any failure; an OSError becomes a message naming the target, not the temp."""
        try:
            yield
        except OSError as e:
            self.discard()
            raise write_error(e, self.path) from None
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        """Flush to disk and rename into place; on any failure the temporary file is removed."""
        with self._discard_on_error():
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)
        self.done = True
        self._release()

    def discard(self) -> None:
        self.done = True
        try:
            if getattr(self, "f", None) is not None:
                self.f.close()
        finally:
            if self.tmp is not None:
                self.tmp.unlink(missing_ok=True)
            self._release()

    def _release(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.__exit__(None, None, None)

    def __enter__(self) -> BinaryIO:
        return self.f

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
            return
        self.discard()
        if isinstance(exc, OSError) and (exc.filename == str(self.tmp) or
                                         (exc.filename is None and exc.errno in _WRITE_ERRNOS)):
            raise write_error(exc, self.path) from None


class StagedDir:
    """The files of a folder built in a hidden staging folder, moved into `target` by `commit()` only once all are
    complete: into a new `target` as one rename, else file by file after checking that every destination lies inside
    `target` without a symlink on the way. Leaving the `with` block by an exception removes everything written."""

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        if self.target.exists() and not self.target.is_dir():
            raise FileExistsError(errno.EEXIST, f"output {self.target} exists and is not a directory")
        self.created: list[Path] = []  # parent folders made for a new target, removed again on failure
        self._guard = terminate_cleanly()
        self._guard.__enter__()
        self.files: list[PurePosixPath] = []
        self._dirs: set[PurePosixPath] = set()
        self._open: tuple[PurePosixPath, BinaryIO] | None = None
        self.merge = self.target.is_dir()
        with self._discard_on_error():
            if self.merge:
                self.stage, _ = fresh_entry(self.target, ".partial-", "", os.mkdir)
            else:
                for p in reversed(self.target.parents):
                    if not p.exists():
                        p.mkdir()
                        self.created.append(p)
                self.stage, _ = fresh_entry(self.target.parent, f".{self.target.name[:100]}.partial-", "", os.mkdir)

    @contextmanager
    def _discard_on_error(self) -> Iterator[None]:
        """Any failure removes what was staged; an OSError comes out as one message naming the target."""
        try:
            yield
        except OSError as e:
            self.discard()
            raise write_error(e, self.target, "write into") from None
        except BaseException:
            self.discard()
            raise

    def open(self, name: object) -> BinaryIO:
        """A new file `name` (validated by safe_relpath) in the staging folder; closes the previous one."""
        rel = safe_relpath(name)
        if rel in self._dirs or rel in self.files or any(p in self.files for p in rel.parents):
            raise UnsafeNameError(f"record {str(rel)!r}: duplicate name, or a name used both as a file and a folder")
        self.close_current()
        path = self.stage.joinpath(*rel.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "wb")
        self._open = (rel, f)
        self.files.append(rel)
        self._dirs.update(rel.parents)
        return f

    def close_current(self) -> None:
        if self._open is not None:
            f, self._open = self._open[1], None
            f.close()

    def _check_destinations(self) -> None:
        root = self.target
        for rel in self.files:
            cur = root
            for part in rel.parts[:-1]:
                cur = cur / part
                if cur.is_symlink() or (cur.exists() and not cur.is_dir()):
                    raise UnsafeNameError(f"record {str(rel)!r}: {cur} in the output folder is a symlink or not a "
                                          "folder; refusing to write through it")
            dst = root.joinpath(*rel.parts)
            if _is_real_dir(dst):
                raise IsADirectoryError(errno.EISDIR, f"record {str(rel)!r}: {dst} is a folder in the output")

    def commit(self) -> None:
        """Move every staged file into the target (all destinations are checked before the first move)."""
        with self._discard_on_error():
            self.close_current()
            if not self.merge:
                os.rename(self.stage, self.target)
            else:
                self._check_destinations()
                for rel in self.files:
                    dst = self.target.joinpath(*rel.parts)
                    for p in reversed([*dst.relative_to(self.target).parents][:-1]):
                        (self.target / p).mkdir(exist_ok=True)
                    os.replace(self.stage.joinpath(*rel.parts), dst)
        self.created.clear()
        self.discard()

    def discard(self) -> None:
        try:
            self.close_current()
        finally:
            stage = getattr(self, "stage", None)
            if stage is not None and stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
            for p in reversed(self.created):
                try:
                    p.rmdir()
                except OSError:
                    break
            self.created.clear()
            guard, self._guard = self._guard, None
            if guard is not None:
                guard.__exit__(None, None, None)

    def __enter__(self) -> StagedDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        self.discard()
        if isinstance(exc, OSError) and (exc.errno in _WRITE_ERRNOS if exc.filename is None else
                                         str(exc.filename).startswith(str(self.stage))):
            raise write_error(exc, self.target, "write into") from None  # name the target, not the staging folder


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path when it is an existing folder; FileNotFoundError / NotADirectoryError saying what it is."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(errno.ENOENT, f"{what} {p} does not exist")
    if not p.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{what} {p} is a file, not a folder")
    return p


def require_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path when it is an existing file; FileNotFoundError / IsADirectoryError saying what it is."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(errno.ENOENT, f"{what} {p} does not exist")
    if p.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"{what} {p} is a folder, not a file")
    return p
