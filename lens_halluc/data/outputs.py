"""Outputs we own: a marker in every output directory, one writer at a time, atomic files.

Every command that writes a directory claims it with :func:`output_dir`, which

- takes a lock (``DIR/.lens_halluc.lock``, held with ``flock`` so a process killed with ``kill -9``
  leaves nothing stale): a second writer is refused with "another lens_halluc process (pid N) is
  writing DIR";
- refuses a directory that is not empty and carries no marker (``--out .``, a folder of your own
  files): nothing in it is touched;
- records in the marker ``DIR/.lens_halluc.json`` the command, the package version, the options
  that change the results and the top-level files and folders the command wrote;
- on ``overwrite`` removes only the entries the marker lists for that command (files someone else
  put in the directory stay), and without it refuses to resume a run made with other options
  ("--out holds a run with metric=prob_diff; use a new --out or --overwrite").

A results *file* (``python -m lens_halluc.caption --out FILE``) is locked with ``FILE.lock`` and is
ours when ``FILE.config.json`` records how it was made (:func:`check_results_file`): anything else is
never truncated nor appended to. :func:`write_bytes_atomic` writes a temporary file, fsyncs it and
renames it into place, so a part on disk is always complete.

Example
-------
>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp()) / "run"
>>> with output_dir(d, "demo", options={"metric": "prob_diff"}) as out:
...     _ = (out / "scores.csv").write_text("x\\n")
>>> read_marker(d)["commands"]["demo"]["files"]
['scores.csv']
"""
from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

MARKER = ".lens_halluc.json"
LOCK = ".lens_halluc.lock"
OURS = (MARKER, LOCK)

try:  # POSIX: a lock the kernel drops when its process dies (kill -9 included)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class OutputError(ValueError):
    """An output path we must not write (not ours, held by another process, made with other options)."""


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


# ------------------------------------------------------------------------------ atomic files
def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file that is fsynced, then renamed (never a torn file).

    The temporary name carries the pid, so two processes never write the same temporary file.

    Example
    -------
    >>> write_bytes_atomic("/tmp/lens_halluc_doc.txt", b"ok").read_bytes()
    b'ok'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def _fsync_dir(d: Path) -> None:
    try:  # make the rename itself durable; not possible everywhere (and not needed for correctness)
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ locks
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """An exclusive lock on ``what`` (a directory or a results file) held through the file ``path``.

    ``acquire()`` raises :class:`OutputError` naming the holder's pid when another process (or another
    lock object of this process) holds it. With ``fcntl`` the kernel releases the lock of a dead
    process; without it a lock file whose pid is dead is taken over.

    Example
    -------
    >>> lock = OutputLock("/tmp/lens_halluc_doc.lock", "/tmp/x")
    >>> with lock:
    ...     pass
    """

    def __init__(self, path: str | Path, what: str | Path, flag: str = "--out"):
        self.path, self.what, self.flag = Path(path), Path(what), flag
        self._fd: int | None = None

    def _refuse(self, pid: str) -> OutputError:
        who = f"pid {pid}" if pid else "pid unknown"
        return OutputError(f"another lens_halluc process ({who}) is writing {self.what}; wait for it to finish, "
                           f"or pass another {self.flag}. (Lock: {self.path}.)")

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    pid = os.read(fd, 64).decode(errors="replace").strip()
                    os.close(fd)
                    if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise self._refuse(pid) from None
                    raise
                # the holder may have removed the file between our open and our flock: retry on the new one
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
            else:  # pragma: no cover - no flock: a pid file, taken over when its process is gone
                pid = os.read(fd, 64).decode(errors="replace").strip()
                if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                    os.close(fd)
                    raise self._refuse(pid)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # while still holding it: a waiting process then retries on a new file
        except FileNotFoundError:
            pass
        os.close(self._fd)  # drops the flock
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------ directories
def read_marker(directory: str | Path) -> dict | None:
    """The marker of a directory we wrote (None when it has none); a damaged marker raises naming it.

    Example
    -------
    >>> read_marker("/nonexistent") is None
    True
    """
    p = Path(directory) / MARKER
    if not p.is_file():
        return None
    try:
        marker = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OutputError(f"{p} is damaged ({e}); it records what lens_halluc wrote in {directory}. Move the "
                          "directory aside and use a new --out.") from None
    if not isinstance(marker, dict) or marker.get("written_by") != "lens_halluc" \
            or not isinstance(marker.get("commands"), dict):
        raise OutputError(f"{p} is not a lens_halluc marker; move {directory} aside and use a new --out.")
    return marker


def _entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name not in OURS and not p.name.startswith(LOCK)}


def _write_marker(directory: Path, marker: dict) -> None:
    write_text_atomic(directory / MARKER, json.dumps(marker, indent=1, sort_keys=True) + "\n")


def _settle(marker: dict, directory: Path) -> None:
    """Give every command whose run did not finish (killed) the entries that appeared during it."""
    now = _entries(directory)
    for rec in marker["commands"].values():
        open_ = rec.pop("open", None)
        if open_ is not None:
            rec["files"] = sorted(set(rec.get("files", [])) | (now - set(open_.get("before", []))))
        rec["files"] = sorted(f for f in rec.get("files", []) if (directory / f).exists() or f in now)


def _describe(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in options.items())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def describe_foreign(directory: Path, entries: set[str]) -> str:
    shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
    return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: {shown}"


@contextmanager
def output_dir(path: str | Path, command: str, overwrite: bool = False, options: Mapping[str, Any] | None = None,
               flag: str = "--out", adopt: tuple[str, ...] = ()) -> Iterator[Path]:
    """Claim ``path`` for ``command`` while the body runs (lock, marker, ``overwrite``, options check).

    Parameters
    ----------
    path : the output directory (created when missing).
    command : the writer, e.g. ``"attribute"`` (a directory may hold the files of several commands).
    overwrite : remove what ``command`` wrote there before (only that).
    options : JSON-able options that change the results; a rerun with other options is refused
        (``None``: not checked, e.g. when the work is keyed by a hash of its inputs).
    flag : the command-line flag named in error messages.
    adopt : glob patterns of what ``command`` writes, the first one a file only it writes (e.g.
        ``("manifest.json", "parts", "*.csv")``): a directory without a marker whose entries all
        match them and that holds the first (written by the library API, or before markers existed)
        is taken as ``command``'s, with those entries as its files.

    Raises :class:`OutputError` (a ``ValueError``) when ``path`` is a file, holds files that are not
    ours, is being written by another process, or holds a run with other options.

    Example
    -------
    >>> with output_dir("runs/attr", "attribute", options={"metric": "prob_diff"}) as out:   # doctest: +SKIP
    ...     (out / "scores.csv").write_text("...")
    """
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{flag} {directory} is a file, not a directory; pass a directory path.")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    options = None if options is None else json.loads(json.dumps(dict(options), default=str))
    lock = OutputLock(directory / LOCK, directory, flag)
    lock.acquire()
    try:
        marker = read_marker(directory)
        if marker is None:
            foreign = _entries(directory)
            adopted = bool(adopt) and (directory / adopt[0]).exists() and all(
                any(fnmatch.fnmatch(e, pat) for pat in adopt) for e in foreign)
            if foreign and not adopted:
                raise OutputError(
                    f"{flag} {directory} is not empty and was not written by lens_halluc (no {MARKER}; it holds "
                    f"{describe_foreign(directory, foreign)}); nothing was changed. Pass a new or empty directory "
                    f"as {flag}." + (" --overwrite only removes what lens_halluc wrote." if overwrite else ""))
            marker = {"written_by": "lens_halluc", "commands": {}}
            if foreign:  # adopted: an earlier run of this command without a marker
                marker["commands"][command] = {"files": sorted(foreign), "options": None}
        _settle(marker, directory)
        rec = marker["commands"].get(command)
        if rec is not None and overwrite:
            for name in rec.get("files", []):
                _remove(directory / name)
            rec = None
        elif (rec is not None and rec.get("files") and options is not None and rec.get("options") is not None
              and rec["options"] != options):  # a run that wrote nothing (failed on its input) holds nothing to mix
            old = rec["options"]
            keys = [k for k in sorted(set(old) | set(options)) if old.get(k) != options.get(k)]
            raise OutputError(
                f"{flag} {directory} holds a {command} run with {_describe({k: old.get(k) for k in keys})} "
                f"(this run: {_describe({k: options.get(k) for k in keys})}); use a new {flag} or --overwrite.")
        rec = rec or {"files": []}
        rec.update(version=_version(), options=options if options is not None else rec.get("options"),
                   open={"pid": os.getpid(), "before": sorted(_entries(directory))})
        marker["commands"][command] = rec
        marker["version"] = _version()
        _write_marker(directory, marker)
    except BaseException:
        lock.release()
        if created and not any(directory.iterdir()):
            directory.rmdir()
        raise
    try:
        yield directory
    finally:
        try:
            marker = read_marker(directory) or marker
            _settle(marker, directory)
            _write_marker(directory, marker)
        finally:
            lock.release()


# ------------------------------------------------------------------------------ results files
def config_path(path: str | Path) -> Path:
    """``FILE.config.json``: how a results file was made (what makes it ours)."""
    path = Path(path)
    return path.with_name(path.name + ".config.json")


def check_results_file(path: str | Path, kind: str, flag: str = "--out") -> None:
    """Refuse ``path`` unless it is absent, empty, or a ``kind`` results file of ours (``FILE.config.json``).

    A file that is not ours is never truncated nor appended to, with or without ``--overwrite``.

    Example
    -------
    >>> check_results_file("/tmp/lens_halluc_absent.jsonl", "captions")
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a directory; pass the path of a .jsonl results file.")
    if not path.exists() or path.stat().st_size == 0:
        return
    meta = config_path(path)
    why = None
    if not meta.is_file():
        why = f"there is no {meta.name} beside it"
    else:
        try:
            recorded = json.loads(meta.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            recorded = None
        if not isinstance(recorded, dict) or recorded.get("kind") != kind:
            got = recorded.get("kind") if isinstance(recorded, dict) else None
            why = f"{meta.name} does not describe {kind}" + (f" (it describes {got})" if got else "")
    if why:
        raise OutputError(f"{flag} {path} exists and is not a lens_halluc {kind} file ({why}); it was left as it "
                          f"is. Pass another {flag} (a new file, or one this command wrote).")


@contextmanager
def results_file(path: str | Path, kind: str, flag: str = "--out") -> Iterator[Path]:
    """Lock a results file (``FILE.lock``) and check it is ours (:func:`check_results_file`) while the body runs.

    Example
    -------
    >>> with results_file("runs/captions.jsonl", "captions") as out:     # doctest: +SKIP
    ...     caption_dataset(vlm, ds, out, check_options=True)
    """
    path = Path(path)
    check_results_file(path, kind, flag)
    with OutputLock(path.with_name(path.name + ".lock"), path, flag):
        check_results_file(path, kind, flag)  # again under the lock: another writer may have just made it
        yield path
