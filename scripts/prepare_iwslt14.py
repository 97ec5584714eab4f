#!/usr/bin/env python3
"""Download and prepare IWSLT 2014 German-English, the main task of ReST.

ReST (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 4) reports IWSLT 2014
De-En with the standard splits of fairseq's `prepare-iwslt14.sh`, which this
script follows:

* training text: `train.tags.de-en.{de,en}` without the lines holding <url>,
  <talkid> or <keywords>, with <title>/<description> tags removed; pairs kept
  when both sides have 1-175 tokens and neither is more than 1.5 times longer
  than the other (Moses `clean-corpus-n.perl -ratio 1.5 ... 1 175`);
* validation: every 23rd of those pairs; train: the others;
* test: the <seg> lines of IWSLT14.TED.dev2010, IWSLT14.TEDX.dev2012 and
  IWSLT14.TED.tst2010/2011/2012, with ’ replaced by ';
* lowercased (as fairseq; `--keep_case` keeps the case).

One deliberate difference: no Moses tokenization and no BPE. rest_jax's
SentencePiece vocabulary works on raw text and sacreBLEU tokenizes itself, so
the files stay detokenized. The length filter counts Moses-like tokens (words
and punctuation marks split apart), so the kept set is close to, but not
guaranteed identical with, fairseq's (160,239 / 7,283 / 6,750 pairs); the
script prints both.

Usage:
  python scripts/prepare_iwslt14.py --output=DATA/iwslt14
  python scripts/prepare_iwslt14.py --output=DATA/iwslt14 --archive=/path/de-en.tgz  # offline

Writes train/valid/test.{de,en} and prepare_info.json into --output; point the
task at it with gin `iwslt14_source.data_dir = 'DATA/iwslt14'`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tarfile
import urllib.error
import urllib.request
from typing import Iterable, Optional, Sequence

URL = "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
ORIGINAL_URL = "https://wit3.fbk.eu/archive/2014-01/texts/de/en/de-en.tgz"
ARCHIVE_NAME = "de-en.tgz"
# SHA-256 of the archive. Left unset: no published value could be checked when
# this script was written. The first preparation records the digest in
# prepare_info.json; pass it as --sha256 (or set it here) to pin later downloads.
KNOWN_SHA256: Optional[str] = None

TRAIN_FILE = "de-en/train.tags.de-en.{lang}"
TEST_SETS = (
    "IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
    "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012",
)
TEST_FILE = "de-en/{name}.de-en.{lang}.xml"
FAIRSEQ_COUNTS = {"train": 160_239, "valid": 7_283, "test": 6_750}
LANGS = ("de", "en")


class PrepareError(RuntimeError):
    """A step failed; the message says what to do."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _offline_help(target: str) -> str:
    return (
        f"Without internet access, download the IWSLT 2014 de-en archive ({ARCHIVE_NAME}) by hand "
        f"from {URL} (fairseq's mirror of {ORIGINAL_URL}) on another machine and either put it "
        f"at {target} or pass --archive=/path/to/{ARCHIVE_NAME}."
    )


def download(url: str, target: str, timeout: float) -> None:
    """One attempt, short timeout: a machine without internet fails in seconds."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = target + ".part"
    print(f"Downloading {url} ...", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                done += len(block)
                if total:
                    print(f"\r  {done / 1e6:.1f} / {total / 1e6:.1f} MB", end="", flush=True)
        print()
    except (urllib.error.URLError, OSError, ValueError) as e:
        if os.path.exists(partial):
            os.remove(partial)
        raise PrepareError(f"Could not download {url}: {e}.\n{_offline_help(target)}") from None
    os.replace(partial, target)


def _read_member(tar: tarfile.TarFile, name: str, archive: str) -> list[str]:
    try:
        member = tar.getmember(name)
    except KeyError:
        raise PrepareError(
            f"{archive} has no {name}: it is not the IWSLT 2014 de-en archive (or it is "
            f"truncated). {_offline_help(archive)}"
        ) from None
    data = tar.extractfile(member).read()
    try:
        return data.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{archive}:{name}: invalid UTF-8 at byte {e.start}.") from None


_TAG_LINE = re.compile(r"<url>|<talkid>|<keywords>")
_TAGS = re.compile(r"</?title>|</?description>")
_SEG = re.compile(r'<seg id="[0-9]*">\s*(.*?)\s*</seg>')
_MOSES_LIKE_TOKEN = re.compile(r"\w+|[^\w\s]")


def clean_train_lines(lines: Iterable[str]) -> list[str]:
    """fairseq's grep/sed on train.tags: drop metadata lines, strip title/description tags."""
    return [_TAGS.sub("", line) for line in lines if not _TAG_LINE.search(line)]


def keep_pair(src: str, tgt: str, ratio: float = 1.5, min_len: int = 1, max_len: int = 175) -> bool:
    """The clean-corpus-n test on Moses-like token counts."""
    ns, nt = len(_MOSES_LIKE_TOKEN.findall(src)), len(_MOSES_LIKE_TOKEN.findall(tgt))
    if not (min_len <= ns <= max_len and min_len <= nt <= max_len):
        return False
    return ns / nt <= ratio and nt / ns <= ratio


def seg_lines(lines: Iterable[str]) -> list[str]:
    """The <seg> contents of an IWSLT xml file, ’ replaced by ' as fairseq does."""
    out = []
    for line in lines:
        if "<seg id" in line:
            match = _SEG.search(line)
            text = match.group(1) if match else line
            out.append(text.replace("\u2019", "'"))
    return out


def _normalize(line: str, lowercase: bool) -> str:
    line = " ".join(line.split())  # clean-corpus-n also trims and squeezes spaces.
    return line.lower() if lowercase else line


def _write_lines(path: str, lines: Sequence[str]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    os.replace(tmp, path)


def prepare(archive: str, output: str, lowercase: bool = True) -> dict[str, int]:
    """Writes train/valid/test.{de,en} from the archive; returns pair counts."""
    with tarfile.open(archive, "r:*") as tar:
        train = {l: clean_train_lines(_read_member(tar, TRAIN_FILE.format(lang=l), archive)) for l in LANGS}
        test = {l: [] for l in LANGS}
        for name in TEST_SETS:
            for l in LANGS:
                test[l] += seg_lines(_read_member(tar, TEST_FILE.format(name=name, lang=l), archive))
    # A trailing newline leaves one empty last element per file.
    for l in LANGS:
        while train[l] and not train[l][-1].strip():
            train[l].pop()
    if len(train["de"]) != len(train["en"]):
        raise PrepareError(
            f"{archive}: after removing metadata lines, {TRAIN_FILE.format(lang='de')} has "
            f"{len(train['de'])} lines and {TRAIN_FILE.format(lang='en')} {len(train['en'])}."
        )
    if len(test["de"]) != len(test["en"]):
        raise PrepareError(f"{archive}: test sets have {len(test['de'])} German and {len(test['en'])} English segments.")
    pairs = [
        (_normalize(d, lowercase), _normalize(e, lowercase))
        for d, e in zip(train["de"], train["en"])
    ]
    pairs = [(d, e) for d, e in pairs if keep_pair(d, e)]
    splits = {
        "train": [p for i, p in enumerate(pairs, start=1) if i % 23 != 0],
        "valid": [p for i, p in enumerate(pairs, start=1) if i % 23 == 0],
        # Empty test segments would break the line files; fairseq keeps them, we drop them.
        "test": [(_normalize(d, lowercase), _normalize(e, lowercase))
                 for d, e in zip(test["de"], test["en"]) if d.strip() and e.strip()],
    }
    os.makedirs(output, exist_ok=True)
    for split, split_pairs in splits.items():
        for i, lang in enumerate(LANGS):
            _write_lines(os.path.join(output, f"{split}.{lang}"), [p[i] for p in split_pairs])
    return {split: len(p) for split, p in splits.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for train/valid/test.{de,en}")
    parser.add_argument("--archive", help=f"an already downloaded {ARCHIVE_NAME}")
    parser.add_argument("--url", default=URL)
    parser.add_argument("--sha256", default=KNOWN_SHA256, help="expected SHA-256 of the archive")
    parser.add_argument("--timeout", type=float, default=20.0, help="download timeout, seconds")
    parser.add_argument("--keep_case", action="store_true", help="do not lowercase")
    args = parser.parse_args(argv)

    try:
        archive = args.archive
        if archive is None:
            archive = os.path.join(args.output, "orig", ARCHIVE_NAME)
            if not os.path.exists(archive):
                download(args.url, archive, args.timeout)
        elif not os.path.exists(archive):
            raise PrepareError(f"--archive {archive} does not exist. {_offline_help(archive)}")
        digest = _sha256(archive)
        if args.sha256 and digest != args.sha256.lower():
            raise PrepareError(
                f"{archive} has SHA-256 {digest}, expected {args.sha256}: the download is corrupt "
                "or a different file. Delete it and run again."
            )
        counts = prepare(archive, args.output, lowercase=not args.keep_case)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = {
        "archive": os.path.abspath(archive),
        "sha256": digest,
        "sha256_checked": bool(args.sha256),
        "lowercase": not args.keep_case,
        "counts": counts,
        "fairseq_counts": FAIRSEQ_COUNTS,
        "recipe": "fairseq prepare-iwslt14.sh splits and cleaning, without Moses tokenization/BPE",
    }
    _write_lines(os.path.join(args.output, "prepare_info.json"), [json.dumps(info, indent=2)])
    for split, n in counts.items():
        print(f"{split}: {n} pairs (fairseq: {FAIRSEQ_COUNTS[split]})")
    if not args.sha256:
        print(f"SHA-256 of {archive}: {digest} (pass --sha256={digest} to pin it)")
    print(f"Wrote {args.output}; use gin: iwslt14_source.data_dir = '{args.output}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
