"""The shared file and tree helpers (`rest_jax.io.atomic`, `rest_jax.tree`), against hand-written expectations."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from rest_jax import tree
from rest_jax.io import atomic


def test_jsonable_turns_arrays_scalars_and_dtypes_into_plain_json():
    value = {"a": np.float32(0.5), 2: (np.int64(3), [jnp.float32, "bfloat16"]), "x": np.arange(3),
             "y": jnp.ones((2,)), "none": None, "dtype": np.dtype("int32"), "fn": len}
    assert atomic.jsonable(value) == {"a": 0.5, "2": [3, ["float32", "bfloat16"]], "x": [0, 1, 2],
                                      "y": [1.0, 1.0], "none": None, "dtype": "int32", "fn": "len"}


def test_write_json_round_trips_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "new" / "r.json"  # the folder is made
    atomic.write_json(path, {"b": [1, 2], "a": np.float64(0.25)})
    assert path.read_text() == '{\n  "a": 0.25,\n  "b": [\n    1,\n    2\n  ]\n}\n'
    assert atomic.read_json(path) == {"a": 0.25, "b": [1, 2]}
    assert os.listdir(path.parent) == ["r.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    atomic.write_text(path, "old\n")

    def broken_rename(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tf.io.gfile, "rename", broken_rename)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_text(path, "new\n")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["a.txt"]


def test_read_json_names_a_damaged_file(tmp_path):
    path = tmp_path / "stage.json"
    path.write_text('{"rows": [1, 2')
    with pytest.raises(ValueError, match="stage.json is not valid JSON"):
        atomic.read_json(path)


def test_flatten_and_unflatten_are_inverse_and_path_str_spells_jax_paths():
    nested = {"encoder": {"layers_0": {"kernel": 1, "bias": 2}}, "decoder": {"logits": 3}}
    flat = tree.flatten(nested)
    assert flat == {"encoder/layers_0/kernel": 1, "encoder/layers_0/bias": 2, "decoder/logits": 3}
    assert tree.unflatten(flat) == nested
    paths = [tree.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": [0, {"b": 1}]})[0]]
    assert paths == ["a/0", "a/1/b"]
    assert json.loads(json.dumps(flat)) == flat
