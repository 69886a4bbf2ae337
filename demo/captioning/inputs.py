"""What to caption: files, folders (searched recursively), quoted globs and list files, in that order.

A path that does not exist or cannot be read is not an abort: it becomes an :class:`Item` with an
``error``, which the command writes as a failed record like any video that fails to decode.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

# Every container ffmpeg (and so decord) demuxes that is commonly used for video. A folder scan keeps
# files with these suffixes; a file named explicitly is always tried, whatever its suffix.
VIDEO_SUFFIXES = frozenset({
    ".mp4", ".m4v", ".mov", ".qt", ".mkv", ".webm", ".avi", ".wmv", ".asf", ".flv", ".f4v", ".ts", ".mts",
    ".m2ts", ".m2t", ".mpg", ".mpeg", ".m1v", ".m2v", ".mpe", ".vob", ".3gp", ".3g2", ".ogv", ".ogg",
    ".dv", ".mxf", ".nut", ".y4m", ".h264", ".264", ".hevc", ".h265", ".gif", ".divx", ".rm", ".rmvb",
})


@dataclass(frozen=True)
class Item:
    """One video to caption. ``path`` is resolved (absolute, symlinks followed), so the same file
    spelled two ways is one item; ``given`` is how the user wrote it. ``error`` is set when the input
    cannot be captioned at all (missing, unreadable): the item is then written as a failed record."""

    path: str
    given: str
    size: int = -1
    mtime: float = -1.0
    error: str | None = None


def _stat_item(path: Path, given: str) -> Item:
    resolved = str(path.resolve())
    try:
        st = path.stat()
    except OSError as e:
        return Item(resolved, given, error=f"cannot read {given}: {e.strerror or e}")
    if not os.access(path, os.R_OK):
        return Item(resolved, given, error=f"cannot read {given}: permission denied")
    return Item(resolved, given, st.st_size, st.st_mtime)


def _scan(folder: Path, given: str) -> list[Item]:
    found = []
    # os.walk with onerror: an unreadable subfolder is skipped, not fatal (rglob would raise).
    errors: list[OSError] = []
    for root, dirs, files in os.walk(folder, onerror=errors.append, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in VIDEO_SUFFIXES:
                p = Path(root) / name
                found.append(_stat_item(p, str(p)))
    for e in errors:
        found.append(Item(str(Path(e.filename or given).resolve()), str(e.filename or given),
                          error=f"cannot read folder {e.filename}: {e.strerror or e}"))
    return found


def read_list_file(path: str) -> list[str]:
    """Paths from a list file, one a line; blank lines and lines starting with ``#`` are ignored.
    ``-`` reads standard input. Relative paths are taken relative to the list file's folder."""
    import sys

    if path == "-":
        lines, base = sys.stdin.read().splitlines(), Path.cwd()
    else:
        p = Path(path).expanduser()
        lines, base = p.read_text().splitlines(), p.parent
    out = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            q = Path(line).expanduser()
            out.append(str(q if q.is_absolute() else base / q))
    return out


def expand(inputs: list[str], files_from: list[str] = ()) -> list[Item]:
    """Every input as :class:`Item`\\ s: a file as itself, a folder searched recursively for
    :data:`VIDEO_SUFFIXES`, a pattern with ``*``/``?``/``[`` as a glob (``**`` recursive), ``@list.txt``
    and each ``files_from`` as a list file. Order is kept, duplicates (same resolved path) dropped."""
    items: list[Item] = []
    queue = list(inputs) + [f"@{f}" for f in files_from]
    for given in queue:
        if given.startswith("@") and len(given) > 1:
            try:
                paths = read_list_file(given[1:])
            except OSError as e:
                items.append(Item(str(Path(given[1:]).resolve()), given,
                                  error=f"cannot read list file {given[1:]}: {e.strerror or e}"))
                continue
            for p in paths:                           # files or folders; no nested lists or globs
                items.extend(_path_items(p))
            continue
        if glob.has_magic(given) and not Path(given).exists():
            matches = sorted(glob.glob(os.path.expanduser(given), recursive=True))
            if not matches:
                items.append(Item(given, given, error=f"no file matches the pattern {given}"))
            for m in matches:
                items.extend(_path_items(m))
            continue
        items.extend(_path_items(given))
    seen: set[str] = set()
    unique = []
    for it in items:
        if it.path not in seen:
            seen.add(it.path)
            unique.append(it)
    return unique


def _path_items(given: str) -> list[Item]:
    p = Path(given).expanduser()
    if p.is_dir():
        return _scan(p, given)
    if not p.exists():
        return [Item(str(p.resolve()), given, error=f"no such file or folder: {given}")]
    return [_stat_item(p, given)]
