"""Readers for parallel text: two aligned line files, or one TSV file.

ReST (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 2) starts from a policy
trained on a parallel corpus and later pairs every Grow sample with its source
and reference, so a silently misaligned pair poisons every stage. The readers
here therefore validate strictly and fail with an error that names the file and
the 1-based line: files with different line counts, empty lines, invalid UTF-8,
missing files, TSV lines without exactly one tab.

Lines are split on ``\\n`` only (a trailing ``\\r`` from CRLF files and a UTF-8
byte-order mark on line 1 are removed); the text is otherwise kept as it is,
since sacreBLEU and reward models need the raw reference.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Optional

import tensorflow as tf

Pair = tuple[str, str]

_BOM = "\ufeff"


class ParallelDataError(ValueError):
    """Bad parallel text; `path` and `line` (1-based, or None) say where."""

    def __init__(self, message: str, path: Optional[str] = None, line: Optional[int] = None):
        super().__init__(message)
        self.path = path
        self.line = line


def _open_lines(path: str) -> Iterator[bytes]:
    """Yields raw lines of `path` (local or any tf.io.gfile filesystem)."""
    if not tf.io.gfile.exists(path):
        raise ParallelDataError(f"Parallel text file not found: {path}", path=path)
    if tf.io.gfile.isdir(path):
        raise ParallelDataError(f"Expected a text file but found a directory: {path}", path=path)
    with tf.io.gfile.GFile(path, "rb") as f:
        # GFile iterates on b"\n" (like TextLineDataset), unlike Python's text
        # mode, which would also split on \r, \x1c, \u2028 ... and so could
        # misalign two files that contain such characters.
        yield from f


def _decode(raw: bytes, path: str, line_no: int, allow_empty: bool = False) -> str:
    """Decodes one raw line to text without its line terminator; empty lines are errors unless allowed."""
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParallelDataError(
            f"{path}:{line_no}: invalid UTF-8 at byte {e.start} of the line "
            f"({raw[max(0, e.start - 10):e.start + 10]!r}).",
            path=path,
            line=line_no,
        ) from None
    if line_no == 1 and text.startswith(_BOM):
        text = text[1:]
    if not text.strip() and not allow_empty:
        raise ParallelDataError(
            f"{path}:{line_no}: empty line. Every line must hold one sentence; an empty line "
            "would pair sentences with the wrong translations.",
            path=path,
            line=line_no,
        )
    return text


def read_lines(path: str, allow_empty: bool = False) -> Iterator[str]:
    """Yields the validated lines of one text file (one sentence a line).

    Args:
      path: The file.
      allow_empty: Accept empty lines (a system's translation may be empty; a source or reference may not).
    """
    for line_no, raw in enumerate(_open_lines(path), start=1):
        yield _decode(raw, path, line_no, allow_empty)


def iter_parallel_files(source_path: str, target_path: str) -> Iterator[Pair]:
    """Yields (source, target) pairs from two aligned line files.

    Args:
      source_path: file whose line i is a source sentence.
      target_path: file whose line i translates line i of `source_path`.

    Yields:
      (source, target) text pairs, in file order.

    Raises:
      ParallelDataError: a file is missing, a line is empty or not UTF-8, or the
        files have different line counts (both names and counts are given).
    """
    src_lines = _open_lines(source_path)
    tgt_lines = _open_lines(target_path)
    line_no = 0
    src_count = tgt_count = None
    for line_no, (src_raw, tgt_raw) in enumerate(
        itertools.zip_longest(src_lines, tgt_lines), start=1
    ):
        if src_raw is None or tgt_raw is None:
            # One file ended: count the rest of the other to report both sizes.
            rest = 1 + sum(1 for _ in (tgt_lines if src_raw is None else src_lines))
            src_count = line_no - 1 if src_raw is None else line_no - 1 + rest
            tgt_count = line_no - 1 if tgt_raw is None else line_no - 1 + rest
            break
        yield _decode(src_raw, source_path, line_no), _decode(tgt_raw, target_path, line_no)
    if src_count is not None:
        raise ParallelDataError(
            f"Parallel files have different line counts: {source_path} has {src_count} lines, "
            f"{target_path} has {tgt_count} lines (so line {line_no} has no partner in the "
            "shorter file).",
            path=source_path if src_count < tgt_count else target_path,
            line=line_no,
        )
    if line_no == 0:
        raise ParallelDataError(
            f"Parallel files are empty: {source_path} and {target_path}.", path=source_path
        )


def iter_tsv(path: str) -> Iterator[Pair]:
    """Yields (source, target) pairs from a TSV file, one `source<TAB>target` a line.

    Raises:
      ParallelDataError: the file is missing or empty, a line is empty or not
        UTF-8, a line has no tab or more than one, or one side is empty.
    """
    line_no = 0
    for line_no, raw in enumerate(_open_lines(path), start=1):
        text = _decode(raw, path, line_no)
        fields = text.split("\t")
        if len(fields) != 2:
            raise ParallelDataError(
                f"{path}:{line_no}: expected exactly one tab (source<TAB>target), found "
                f"{len(fields) - 1}: {text[:80]!r}",
                path=path,
                line=line_no,
            )
        src, tgt = fields
        for side, value in (("source", src), ("target", tgt)):
            if not value.strip():
                raise ParallelDataError(
                    f"{path}:{line_no}: empty {side} field: {text[:80]!r}", path=path, line=line_no
                )
        yield src, tgt
    if line_no == 0:
        raise ParallelDataError(f"TSV file is empty: {path}", path=path)


def read_parallel_files(source_path: str, target_path: str) -> list[Pair]:
    """All (source, target) pairs of two aligned line files; see `iter_parallel_files`."""
    return list(iter_parallel_files(source_path, target_path))


def read_tsv(path: str) -> list[Pair]:
    """All (source, target) pairs of a TSV file; see `iter_tsv`."""
    return list(iter_tsv(path))


def read_parallel(
    source_path: Optional[str] = None,
    target_path: Optional[str] = None,
    tsv_path: Optional[str] = None,
    swap: bool = False,
) -> list[Pair]:
    """Reads pairs from either two line files or one TSV, optionally swapped.

    Args:
      source_path: first column's line file (with `target_path`).
      target_path: second column's line file.
      tsv_path: a TSV file instead of the two line files.
      swap: return (second, first): the other translation direction.

    Returns:
      The list of validated pairs.
    """
    if tsv_path and (source_path or target_path):
        raise ValueError(
            f"Give either a TSV file ({tsv_path}) or two line files "
            f"({source_path}, {target_path}), not both."
        )
    if tsv_path:
        pairs = read_tsv(tsv_path)
    elif source_path and target_path:
        pairs = read_parallel_files(source_path, target_path)
    else:
        raise ValueError(
            "Parallel text needs a TSV file or both a source and a target line file; got "
            f"source={source_path!r}, target={target_path!r}, tsv={tsv_path!r}."
        )
    if swap:
        pairs = [(t, s) for s, t in pairs]
    return pairs


def write_lines(path: str, lines: list[str]) -> None:
    """Writes one sentence a line, atomically (temp name, then rename)."""
    for i, line in enumerate(lines, start=1):
        if "\n" in line or "\r" in line or not line.strip():
            raise ValueError(f"Line {i} for {path} is empty or holds a line break: {line!r}")
    tmp = f"{path}.tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    tf.io.gfile.rename(tmp, path, overwrite=True)
