"""The output of a captioning run: JSON lines, one record per video, and what makes resume exact.

- A record's ``key`` hashes what decides its caption: the resolved path, the file's size and mtime, the
  model, the settings (sampling, compression, generation) and the prompt. A re-run skips exactly the
  keys already done; change any of them and the video is captioned again.
- A torn last line (a kill during a write, a full disk) is dropped with a warning and the file is cut
  back to its last complete line; a bad line elsewhere is skipped with a warning. Never a crash.
- One writer per output: a lock file beside it (``<output>.lock``, via ``filelock``) is taken for the
  whole run; a second run on the same output stops with a clear message instead of writing twice.
- ``-o DIR/`` (an existing folder, or a name ending in ``/``): each run writes its own shard
  ``part-<time>-<pid>-<random>.jsonl`` there; resume reads every ``*.jsonl`` in the folder.
- ``-o -``: JSON lines to standard output; nothing to resume from, no lock.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["OutputLocked", "Store", "record_key"]


def record_key(path: str, size: int, mtime: float, model: str, settings: dict, prompt: str) -> str:
    """A stable id of one (video file version, model, settings, prompt): 32 hex characters."""
    payload = json.dumps({"path": path, "size": size, "mtime": mtime, "model": model, "settings": settings,
                          "prompt": prompt}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class OutputLocked(Exception):
    pass


class Store:
    """Read what an output already holds, and append records to it (see the module docstring)."""

    def __init__(self, output: str, *, warn=None):
        self.output = output
        self.warn = warn or (lambda msg: print(f"vlmcompress-caption: warning: {msg}", file=sys.stderr))
        self.stdout = output == "-"
        self.is_dir = not self.stdout and (output.endswith(("/", os.sep)) or Path(output).is_dir())
        self.path = None if self.stdout else Path(output)
        self._lock = None
        self._fd: int | None = None
        self.write_path: Path | None = None
        self._created = False

    # -- checks and the lock ---------------------------------------------------------------------
    def check(self) -> None:
        """Raise ``ValueError`` (with a plain message) when the output cannot be written at all; done
        before the model loads, so a typo costs nothing."""
        if self.stdout:
            return
        parent = self.path if self.is_dir and self.path.exists() else self.path.parent
        if not self.is_dir and self.path.is_dir():
            raise ValueError(f"output {self.output} is a folder; end it with / to write shards into it")
        if not parent.exists() and not (self.is_dir and self.path.parent.exists()):
            raise ValueError(f"output folder {parent} does not exist")
        target = parent if parent.exists() else self.path.parent
        if not os.access(target, os.W_OK):
            raise ValueError(f"output folder {target} is not writable")

    def lock(self) -> None:
        if self.stdout:
            return
        from filelock import FileLock, Timeout

        if self.is_dir:
            self.path.mkdir(exist_ok=True)
        lock_path = self.path / ".lock" if self.is_dir else self.path.with_name(self.path.name + ".lock")
        lock = FileLock(str(lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise OutputLocked(f"another run is writing {self.output} (lock {lock_path} is held); wait for it to "
                               "finish, or write elsewhere with -o") from None
        self._lock = lock

    # -- reading ---------------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        if self.stdout:
            return []
        if self.is_dir:
            return sorted(self.path.glob("*.jsonl")) if self.path.exists() else []
        return [self.path] if self.path.exists() else []

    def _read(self, file: Path) -> list[dict]:
        data = file.read_bytes()
        records, good_end = [], 0
        lines = data.split(b"\n")
        for i, raw in enumerate(lines):
            last = i == len(lines) - 1             # what follows the final newline: b"" in a whole file
            if last and raw == b"":
                break
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
            except ValueError:
                if last:                       # no newline after it: a write that was cut off
                    self.warn(f"{file}: the last line is cut off (an interrupted write); ignoring it and "
                              "removing it from the file")
                    with open(file, "r+b") as f:
                        f.truncate(good_end)
                    break
                if raw.strip():
                    self.warn(f"{file}: line {i + 1} is not valid JSON; ignoring it")
                good_end += len(raw) + 1
                continue
            if last:                           # complete JSON but no trailing newline: keep it, end the line
                with open(file, "ab") as f:
                    f.write(b"\n")
            records.append(rec)
            good_end += len(raw) + 1
        return records

    def load(self) -> dict[str, str]:
        """``key -> "done" | "failed"`` for every keyed record already written (the last one wins)."""
        status: dict[str, str] = {}
        for file in self._files():
            for rec in self._read(file):
                key = rec.get("key")
                if isinstance(key, str):
                    status[key] = "failed" if rec.get("error") else "done"
        return status

    def drop(self, keys: set[str]) -> int:
        """Remove the records of ``keys`` (about to be captioned again: ``--retry-failed``,
        ``--overwrite``), so each video keeps exactly one record. Each file is rewritten beside itself and
        swapped in with an atomic rename: a kill leaves the old file or the new one, never half."""
        if not keys:
            return 0
        removed = 0
        for file in self._files():
            lines = file.read_bytes().splitlines(keepends=True)
            keep = []
            for raw in lines:
                try:
                    gone = json.loads(raw).get("key") in keys
                except (ValueError, AttributeError):
                    gone = False
                removed += gone
                if not gone:
                    keep.append(raw)
            if len(keep) != len(lines):
                tmp = file.with_name(file.name + ".tmp")
                tmp.write_bytes(b"".join(keep))
                os.replace(tmp, file)
        return removed

    # -- writing ---------------------------------------------------------------------------------
    def open(self) -> None:
        if self.stdout:
            return
        if self.is_dir:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            self.write_path = self.path / f"part-{stamp}-{os.getpid()}-{os.urandom(3).hex()}.jsonl"
        else:
            self.write_path = self.path
        self._created = not self.write_path.exists()
        self._fd = os.open(self.write_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, record: dict) -> None:
        """Append one record as one line. The line goes out in as few ``write()`` calls as the OS
        allows, straight to the file (no Python buffer), so a kill loses at most the line in flight."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        if self.stdout:
            sys.stdout.write(line.decode())
            sys.stdout.flush()
            return
        view = memoryview(line)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if self._created and self.write_path.stat().st_size == 0:
                self.write_path.unlink()               # a run that wrote nothing leaves no empty file
        if self._lock is not None:
            self._lock.release()
            self._lock = None
