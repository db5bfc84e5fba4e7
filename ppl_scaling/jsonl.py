"""Append-only JSONL result files that survive interruption, refuse what is not theirs, and resume.

Long evaluations write one JSON line per finished unit of work, flushed and fsynced
at once, so Ctrl-C, a crash or SIGKILL loses at most the unit in flight. Rerunning the
same command reads the file, skips the units already done and appends the rest::

    with ResultsFile("results.jsonl", key=("problem_id", "method", "budget"),
                     settings={"seed": 0, "temperature": 0.8}) as out:
        for job in jobs:
            if out.done(job): continue
            out.write({**job, "correct": ...})

The file's first line is a header record that names the run's settings::

    {"ppl_scaling_results": 1, "settings_id": "3f2a...", "settings": {...}, "info": {...}}

and every row written through ``write`` carries the same ``settings_id``. What this
class guarantees:

- **Only its own files.** A file whose first line is not such a header (a text file, a
  dataset, a results file of an older version) is refused with ``NotAResultsFile``; a
  file with a corrupt line in the middle is refused with the line number. Refusals
  change nothing: not a byte, not the modification time.
- **Same settings or nothing.** With ``settings``, a file written with other settings
  is refused with ``SettingsMismatch`` (a ``ValueError`` whose message names every
  differing setting, the file's value and the new one), before anything is touched.
- **One writer.** An advisory lock (``fcntl.flock``, exclusive, non-blocking) is held
  from opening to ``close``; a second writer gets ``ResultsFileBusy`` at once. The lock
  is released by the kernel when a writer dies, even by SIGKILL. (Advisory locks
  work on local file systems; some network file systems do not support them.)
- **Careful repair.** Only an incomplete record is removed: a last line without its
  newline that does not parse (a write cut off by a kill). A complete last record that
  lost its newline gets it back. Repairs, like ``replace``, rewrite the file atomically:
  a temporary file in the same folder, fsynced, locked, then ``os.replace``.
- **No duplicates.** ``write`` refuses a key that is already in the file.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Iterable

__all__ = ["ResultsFile", "ResultsFileError", "NotAResultsFile", "ResultsFileBusy", "SettingsMismatch",
           "MARKER", "FORMAT", "settings_id", "is_header", "clip"]

MARKER = "ppl_scaling_results"   # the header's first key; its value is the format version
FORMAT = 1


class ResultsFileError(ValueError):
    """The results file cannot be used as it is (nothing in it was changed)."""


class NotAResultsFile(ResultsFileError):
    """The file exists but is not a results file of this tool."""


class ResultsFileBusy(ResultsFileError):
    """Another process holds the file's lock (it is writing the file)."""


class SettingsMismatch(ResultsFileError):
    """The file holds results of other settings. ``differences``: [(name, in_file, now)]."""

    def __init__(self, message: str, differences: list[tuple[str, Any, Any]]) -> None:
        super().__init__(message)
        self.differences = differences


def clip(value: Any, limit: int = 300) -> str:
    """``value`` as text (a ``str`` as it is, anything else as its repr), cut to ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def settings_id(settings: dict[str, Any]) -> str:
    """A short, stable hash of a settings dictionary (12 hex digits of sha256 of its canonical JSON)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def is_header(record: Any) -> bool:
    return isinstance(record, dict) and MARKER in record


def _header(settings: dict[str, Any], info: dict[str, Any] | None) -> dict[str, Any]:
    return {MARKER: FORMAT, "settings_id": settings_id(settings), "settings": settings, "info": info or {}}


def _show(value: Any) -> str:
    return "(not recorded)" if value is _ABSENT else clip(json.dumps(value) if not isinstance(value, str)
                                                          else repr(value), 80)


_ABSENT = object()


class ResultsFile:
    """A locked, resumable results file; see the module docstring.

    ``key``: the fields that identify a unit of work. ``settings``: what must agree
    between a run and its resumption (``None``: accept the file's, whatever they are).
    ``info``: recorded in the header of a new file, never compared. ``what``: how the
    file is called in messages (e.g. "--out").
    """

    def __init__(self, path: str | Path, key: Iterable[str], *, settings: dict[str, Any] | None = None,
                 info: dict[str, Any] | None = None, what: str = "--out") -> None:
        self.path = Path(path).expanduser()
        self.key = tuple(key)
        self.what = what
        self.rows: list[dict[str, Any]] = []
        self.header: dict[str, Any] = {}
        self.repaired: str | None = None     # what the opening repair did, if anything
        self._done: dict[tuple, int] = {}    # key -> index in rows
        self._lines: list[bytes] = []        # the file's lines (header first), without newlines
        self._fd: int | None = None
        self._real = Path(os.path.realpath(self.path))
        self._real.parent.mkdir(parents=True, exist_ok=True)
        self._fd = self._open_locked()
        try:
            self._load(settings, info)
        except BaseException:
            self.close()
            raise

    # -- opening -------------------------------------------------------------------------
    def _open_locked(self) -> int:
        """Open (creating if absent) and lock the file; retry if it was replaced meanwhile."""
        for _ in range(20):
            try:
                fd = os.open(self._real, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
            except IsADirectoryError:
                raise ResultsFileError(f"{self.what} {str(self.path)!r} is a folder; pass a file name such as "
                                       "results.jsonl") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._busy() from None
                raise OSError(e.errno, f"cannot lock {str(self.path)!r} ({e.strerror}); results files need a "
                                       "file system with flock (a local disk)") from None
            try:
                st, now = os.fstat(fd), os.stat(self._real)
                same = (st.st_ino, st.st_dev) == (now.st_ino, now.st_dev)
            except FileNotFoundError:
                same = False
            if same:
                if not stat.S_ISREG(st.st_mode):
                    os.close(fd)
                    raise ResultsFileError(f"{self.what} {str(self.path)!r} is not a regular file")
                return fd
            os.close(fd)   # replaced between open and lock: open the new file
        raise ResultsFileBusy(f"{str(self.path)!r} keeps being replaced by another process; write to another "
                              f"{self.what}")

    def _read(self) -> bytes:
        chunks, offset = [], 0
        while True:
            chunk = os.pread(self._fd, 1 << 20, offset)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            offset += len(chunk)

    def _refuse(self, why: str) -> NotAResultsFile:
        return NotAResultsFile(f"{self.what} {str(self.path)!r} {why}; nothing was changed: write to another "
                               f"{self.what} (or move that file away)")

    def _load(self, settings: dict[str, Any] | None, info: dict[str, Any] | None) -> None:
        data = self._read()
        if not data:
            self._create(settings or {}, info)
            return
        header, rows, done, lines, fix = self._parse(data)
        if settings is not None:
            self._compare(header["settings"], settings)
        self.header, self.rows, self._done, self._lines = header, rows, done, lines
        if fix is not None:   # only now, after every check passed
            self._rewrite(self._lines)
            self.repaired = fix

    def _parse(self, data: bytes) -> tuple[dict, list[dict], dict[tuple, int], list[bytes], str | None]:
        """(header, rows, key -> row index, lines, repair needed) of a file's bytes; raises if it is
        not a results file or has a corrupt line."""
        if not data.strip():
            raise self._refuse("holds only blank space, not a ppl-scaling results file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise self._refuse("is not a ppl-scaling results file (not UTF-8 text)") from None
        lines = text.split("\n")
        complete, tail = lines[:-1], lines[-1]    # tail: after the last newline ("" if the file ends in one)
        records: list[tuple[int, str, Any]] = []  # (line number, text, parsed)
        for i, line in enumerate(complete, 1):
            try:
                records.append((i, line, json.loads(line) if line.strip() else None))
            except json.JSONDecodeError as e:
                if i == 1:
                    raise self._refuse(f"is not a ppl-scaling results file (line 1 is not JSON: {clip(line, 80)})") \
                        from None
                raise ResultsFileError(f"{str(self.path)!r}:{i}: not a valid JSON record ({e.msg}): {clip(line)}; "
                                       "fix or remove that line (nothing was changed)") from None
        if tail:
            try:
                records.append((len(complete) + 1, tail, json.loads(tail)))
                fix = "restored the newline of the last record"
            except json.JSONDecodeError:
                if not tail.lstrip().startswith("{") or not records:
                    raise self._refuse(f"is not a ppl-scaling results file (its last line is {clip(tail, 80)})") \
                        from None
                fix = f"removed an incomplete last record ({len(tail)} characters; an interrupted write)"
        else:
            fix = None
        first = records[0][2] if records else None
        if not is_header(first):
            if isinstance(first, dict) and all(k in first for k in self.key):
                raise self._refuse("was written by an older version of ppl-scaling (it has no settings header, "
                                   "so resuming cannot check the settings); `ppl-scaling report` still reads it")
            raise self._refuse(f"is not a ppl-scaling results file (its first line is {clip(records[0][1], 80)})")
        if first.get(MARKER) != FORMAT or not isinstance(first.get("settings"), dict):
            raise self._refuse(f"has a results header of format {clip(first.get(MARKER), 20)} (this version "
                               f"reads format {FORMAT})")
        rows, done = [], {}
        for i, line, rec in records[1:]:
            if rec is None:
                continue
            if is_header(rec):
                raise ResultsFileError(f"{str(self.path)!r}:{i}: a second header (were two files concatenated?); "
                                       "split the file (nothing was changed)")
            if not isinstance(rec, dict) or not all(k in rec for k in self.key):
                raise ResultsFileError(f"{str(self.path)!r}:{i}: not a result record (a JSON object with "
                                       f"{', '.join(self.key)}): {clip(line)}; fix or remove that line "
                                       "(nothing was changed)")
            done.setdefault(self._key(rec), len(rows))
            rows.append(rec)
        return first, rows, done, [line.encode() for _, line, _ in records], fix

    @classmethod
    def peek(cls, path: str | Path, key: Iterable[str], *, what: str = "--out") -> dict[str, Any] | None:
        """The header of the results file at ``path`` (None if there is none yet, or it is
        empty), without creating, locking for long or changing anything: raises as opening
        would if the file is not a results file or another process is writing it."""
        self = cls.__new__(cls)
        self.path, self.key, self.what = Path(path).expanduser(), tuple(key), what
        self._fd = None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise ResultsFileError(f"{what} {str(self.path)!r} is a folder; pass a file name such as "
                                   "results.jsonl") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ResultsFileError(f"{what} {str(self.path)!r} is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._busy() from None
            self._fd = fd
            data = self._read()
        finally:
            self._fd = None
            os.close(fd)
        return self._parse(data)[0] if data else None

    def _busy(self) -> ResultsFileBusy:
        return ResultsFileBusy(f"{str(self.path)!r} is being written by another process (it holds the file's "
                               f"lock); wait for it to finish, or write to another {self.what}")

    def _compare(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        names = list(dict.fromkeys([*old, *new]))
        diff = [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in names
                if old.get(k, _ABSENT) != new.get(k, _ABSENT)]
        if diff:
            what = "; ".join(f"{k}: {_show(a)} in the file, {_show(b)} now" for k, a, b in diff)
            raise SettingsMismatch(
                f"{str(self.path)!r} holds results of other settings ({what}). Nothing was changed: rerun with "
                f"the file's settings to resume it, or write to another {self.what}",
                [(k, None if a is _ABSENT else a, None if b is _ABSENT else b) for k, a, b in diff])

    def _create(self, settings: dict[str, Any], info: dict[str, Any] | None) -> None:
        self.header = _header(settings, info)
        line = json.dumps(self.header).encode()
        self._append(line + b"\n")
        self._lines = [line]

    # -- reading -------------------------------------------------------------------------
    @property
    def settings(self) -> dict[str, Any]:
        return self.header.get("settings", {})

    @property
    def settings_id(self) -> str:
        return self.header.get("settings_id", "")

    def _key(self, row: dict[str, Any]) -> tuple:
        try:
            return tuple(_hashable(row[k]) for k in self.key)
        except KeyError as e:
            raise ValueError(f"result row lacks the key field {e}; every row needs {self.key}") from None

    def done(self, job: dict[str, Any]) -> bool:
        return self._key(job) in self._done

    def get(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """The row of ``job``'s key, or None."""
        i = self._done.get(self._key(job))
        return None if i is None else self.rows[i]

    # -- writing -------------------------------------------------------------------------
    def _row_line(self, row: dict[str, Any]) -> bytes:
        if self._fd is None:
            raise ValueError(f"{str(self.path)!r} is closed")
        if self.settings_id and row.get("settings_id", self.settings_id) != self.settings_id:
            raise ValueError(f"row of settings {row['settings_id']} written to a file of settings {self.settings_id}")
        row = {**row, "settings_id": self.settings_id} if self.settings_id else row
        line = json.dumps(row, allow_nan=False)
        json.loads(line)   # a row that does not read back is refused before it is written
        return line.encode()

    def write(self, row: dict[str, Any]) -> dict[str, Any]:
        """Append ``row`` (flushed and fsynced); its key must be new. Returns the row as stored."""
        key = self._key(row)
        if key in self._done:
            raise ValueError(f"{str(self.path)!r} already holds a row for {dict(zip(self.key, key))}")
        line = self._row_line(row)
        self._append(line + b"\n")
        stored = json.loads(line)
        self._lines.append(line)
        self._done[key] = len(self.rows)
        self.rows.append(stored)
        return stored

    def replace(self, row: dict[str, Any]) -> dict[str, Any]:
        """Replace the row with ``row``'s key (which must exist) by ``row``, atomically."""
        key = self._key(row)
        if key not in self._done:
            raise ValueError(f"{str(self.path)!r} holds no row for {dict(zip(self.key, key))} to replace")
        line = self._row_line(row)
        i = self._done[key]
        self._rewrite(self._lines_with(i, line))
        self.rows[i] = json.loads(line)
        return self.rows[i]

    def _lines_with(self, i: int, line: bytes) -> list[bytes]:
        out, seen = [], -1
        for raw in self._lines:
            if raw.strip() and out:   # a record after the header
                seen += 1
                if seen == i:
                    out.append(line)
                    continue
            out.append(raw)
        return out

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def _rewrite(self, lines: list[bytes]) -> None:
        """The file becomes ``lines`` (newline-terminated) at once: temp file, fsync, lock, os.replace."""
        folder = self._real.parent
        tmp = folder / f".{self._real.name}.{secrets.token_hex(6)}.tmp"
        fd_new = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd_new, stat.S_IMODE(os.fstat(self._fd).st_mode))
            fcntl.flock(fd_new, fcntl.LOCK_EX | fcntl.LOCK_NB)   # locked before it becomes the file
            data = memoryview(b"".join(line + b"\n" for line in lines))
            while data:
                data = data[os.write(fd_new, data):]
            os.fsync(fd_new)
            os.replace(tmp, self._real)
        except BaseException:
            os.close(fd_new)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(folder)
        old, self._fd = self._fd, fd_new
        os.close(old)
        self._lines = list(lines)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # releases the lock
            self._fd = None

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
