"""Parallel-text readers: good input read exactly, each kind of bad input named by file and line."""

import pathlib

import pytest

from rest_jax.data import text_files
from rest_jax.data.text_files import ParallelDataError


def _write(path: pathlib.Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_two_files_read_in_order_with_crlf_and_bom(tmp_path):
    src = _write(tmp_path / "a.de", "\ufeffEin Hund.\r\nZwei\tKatzen.\r\n".encode())
    tgt = _write(tmp_path / "a.en", b"A dog.\nTwo cats.")  # No final newline.
    assert text_files.read_parallel_files(src, tgt) == [
        ("Ein Hund.", "A dog."),
        ("Zwei\tKatzen.", "Two cats."),  # A tab inside a line file is text (Multi30k has one).
    ]
    assert text_files.read_parallel(src, tgt, swap=True)[1] == ("Two cats.", "Zwei\tKatzen.")


def test_tsv_read(tmp_path):
    tsv = _write(tmp_path / "a.tsv", "Haus\thouse\nGrüße\tgreetings\n".encode())
    assert text_files.read_tsv(tsv) == [("Haus", "house"), ("Grüße", "greetings")]
    assert text_files.read_parallel(tsv_path=tsv) == text_files.read_tsv(tsv)


@pytest.mark.parametrize("longer", ["source", "target"])
def test_different_line_counts_name_both_files_and_counts(tmp_path, longer):
    three, two = b"a\nb\nc\n", b"x\ny\n"
    src = _write(tmp_path / "s.txt", three if longer == "source" else two)
    tgt = _write(tmp_path / "t.txt", two if longer == "source" else three)
    with pytest.raises(ParallelDataError) as e:
        text_files.read_parallel_files(src, tgt)
    msg = str(e.value)
    counts = (3, 2) if longer == "source" else (2, 3)
    assert f"{src} has {counts[0]} lines" in msg and f"{tgt} has {counts[1]} lines" in msg
    assert e.value.line == 3
    assert isinstance(e.value, ValueError)


def test_empty_line_names_file_and_line(tmp_path):
    src = _write(tmp_path / "s.txt", b"a\nb\n  \nd\n")
    tgt = _write(tmp_path / "t.txt", b"w\nx\ny\nz\n")
    with pytest.raises(ParallelDataError, match=rf"{src}:3: empty line"):
        text_files.read_parallel_files(src, tgt)


def test_trailing_blank_line_is_an_error(tmp_path):
    src = _write(tmp_path / "s.txt", b"a\nb\n\n")
    tgt = _write(tmp_path / "t.txt", b"x\ny\n\n")
    with pytest.raises(ParallelDataError, match=r"s.txt:3: empty line"):
        text_files.read_parallel_files(src, tgt)


def test_invalid_utf8_names_file_and_line(tmp_path):
    src = _write(tmp_path / "s.txt", b"gut\nb\xe4se\n")  # Latin-1 "ä".
    tgt = _write(tmp_path / "t.txt", b"good\nbad\n")
    with pytest.raises(ParallelDataError, match=rf"{src}:2: invalid UTF-8 at byte 1") as e:
        text_files.read_parallel_files(src, tgt)
    assert (e.value.path, e.value.line) == (src, 2)


def test_missing_file_is_named(tmp_path):
    src = _write(tmp_path / "s.txt", b"a\n")
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(ParallelDataError, match=f"not found: {missing}"):
        text_files.read_parallel_files(src, missing)
    with pytest.raises(ParallelDataError, match="not found"):
        text_files.read_tsv(missing)


@pytest.mark.parametrize("bad_line, tabs", [("no tab here", 0), ("a\tb\tc", 2)])
def test_tsv_line_without_exactly_one_tab(tmp_path, bad_line, tabs):
    tsv = _write(tmp_path / "d.tsv", f"a\tb\n{bad_line}\n".encode())
    with pytest.raises(ParallelDataError, match=rf"{tsv}:2: expected exactly one tab .* found {tabs}"):
        text_files.read_tsv(tsv)


def test_tsv_empty_side(tmp_path):
    tsv = _write(tmp_path / "d.tsv", b"a\tb\nc\t \n")
    with pytest.raises(ParallelDataError, match=r"d.tsv:2: empty target field"):
        text_files.read_tsv(tsv)


def test_both_inputs_given_is_rejected(tmp_path):
    tsv = _write(tmp_path / "d.tsv", b"a\tb\n")
    with pytest.raises(ValueError, match="not both"):
        text_files.read_parallel(tsv, tsv, tsv_path=tsv)


def test_write_lines_round_trip_and_refuses_line_breaks(tmp_path):
    path = str(tmp_path / "out.txt")
    text_files.write_lines(path, ["eins", "zwei"])
    assert pathlib.Path(path).read_text() == "eins\nzwei\n"
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="Line 2"):
        text_files.write_lines(path, ["ok", "bad\nline"])
