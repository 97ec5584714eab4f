"""Files written whole or not at all, and JSON for run records: one way to do it for every module.

A write goes to a unique temporary name beside the target, is flushed to disk (local files), and is renamed
over the target, so a reader, a crash or a concurrent writer never sees half a file (`docs/faults.md`).
Paths may be local or remote (`gs://`, through `tf.io.gfile`, as TPU pods keep their runs).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

TMP_MARK = ".tmp-"  # in every temporary name, so a sweep can tell them from real files


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` through a temporary name and a rename (the parent folder is created)."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    tmp = os.path.join(parent, f".{os.path.basename(path)}{TMP_MARK}{uuid.uuid4().hex}")
    try:
        with tf.io.gfile.GFile(tmp, "wb") as f:
            f.write(data)
        if "://" not in tmp:  # a rename commits only what is on disk; gs:// objects are whole by themselves
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        tf.io.gfile.rename(tmp, path, overwrite=True)
    except BaseException:
        # The old file (if any) is untouched; do not leave a half-written temporary behind (e.g. disk full).
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types: mappings, sequences, numbers, strings; arrays as lists, NumPy scalars as
    numbers, dtypes (jnp.bfloat16, np.float32, 'float32') by name, other objects by name or `str`."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "tolist") and hasattr(value, "shape"):  # NumPy and JAX arrays
        return jsonable(np.asarray(value).tolist())
    try:
        return np.dtype(value).name
    except TypeError:
        return getattr(value, "__name__", str(value))


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2, sort_keys: bool = True) -> None:
    """Writes `jsonable(obj)` as JSON (atomically), ending in a newline."""
    write_text(path, json.dumps(jsonable(obj), indent=indent, sort_keys=sort_keys) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Parses a JSON file; an unparsable one (copied partly or damaged: our writes are atomic) names itself."""
    with tf.io.gfile.GFile(os.fspath(path), "r") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)} is not valid JSON ({e}): the file is truncated or damaged. Delete it "
                         "and rerun the same command to redo what wrote it (finished BC checkpoints and Grow "
                         "shards are reused).") from e
