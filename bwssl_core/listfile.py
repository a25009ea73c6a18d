"""Video list files in VideoMAE's format: one `relative/path.mp4 label` per line.

The label is the last whitespace-separated token and the path is everything before it, so paths
may contain spaces. Paths are relative to `root` (default: the list file's folder); blank lines are
skipped. Every problem is a DataError naming the list file and the line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Input data that cannot be used: the message names the file and, for list files, the line."""


@dataclass(frozen=True)
class VideoEntry:
    path: Path  # absolute
    label: int
    line: int  # 1-based line in the list file
    source: str  # "train.csv:7"


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be a video file (missing, not a file, empty, a name the OS refuses), or None."""
    try:
        if not path.exists():
            return "no such file"
        if not path.is_file():
            return "not a file"
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
    except OSError as err:  # e.g. a name too long, or a folder we may not read
        return f"cannot be checked ({err.strerror or err})"
    return None


def parse_list_file(list_path: str | Path, root: str | Path | None = None, num_classes: int | None = None,
                    check_files: bool = True) -> list[VideoEntry]:
    """Entries of a list file, in file order. `check_files=False` leaves missing and empty video files
    to the caller (VideoClips(skip_bad=True) drops them instead of failing)."""
    list_path = Path(list_path)
    try:
        text = list_path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{list_path}: cannot read the list file ({err.__class__.__name__}: {err})") from None
    root = Path(root) if root is not None else list_path.parent
    entries, seen = [], {}
    for line_no, line in enumerate(text.splitlines(), 1):
        where = f"{list_path}:{line_no}"
        tokens = line.strip().rsplit(maxsplit=1)
        if not tokens:
            continue
        if len(tokens) < 2:
            raise DataError(f"{where}: expected 'path label', found one column {tokens[0]!r}")
        rel, label_text = tokens
        try:
            label = int(label_text)
        except ValueError:
            raise DataError(f"{where}: label {label_text!r} is not an integer") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            allowed = f"0..{num_classes - 1}" if num_classes is not None else "a label >= 0"
            raise DataError(f"{where}: unknown label {label} (expected {allowed})")
        path = Path(os.path.abspath(root / rel))
        if path in seen:
            raise DataError(f"{where}: duplicate path {rel!r}, already on line {seen[path]}")
        seen[path] = line_no
        if check_files and (problem := file_problem(path)):
            raise DataError(f"{where}: {path}: {problem}")
        entries.append(VideoEntry(path, label, line_no, f"{list_path.name}:{line_no}"))
    if not entries:
        raise DataError(f"{list_path}: no videos listed")
    return entries


__all__ = ["DataError", "VideoEntry", "file_problem", "parse_list_file"]
