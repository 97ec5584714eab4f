"""A run directory given relative to the working directory (as in the README) checkpoints and restores."""

import jax.numpy as jnp
import numpy as np

from rest_jax import checkpoints


def test_relative_directory_saves_and_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(3)}
    manager = checkpoints.CheckpointManager("runs/x/checkpoints", keep=1, period=1)
    manager.save(3, state, force=True)
    manager.close()
    assert (tmp_path / "runs" / "x" / "checkpoints" / "3").is_dir()
    params = checkpoints.load_params("runs/x/checkpoints")
    np.testing.assert_array_equal(np.asarray(params["w"]), np.arange(6.0).reshape(2, 3))
