"""Test set-up: 8 simulated CPU devices so sharding is testable without a TPU."""

import os

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import atexit  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent XLA compilation cache for this test session, in-process and in every subprocess (the
# documented commands, multi-process launches): most of those compile the same tiny-model programs, and
# compiling is most of a tiny run's time. Fresh per session, so no stale entry outlives a change of code.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rest_jax_test_xla_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

MULTI30K_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> pathlib.Path:
    """The demo ReST loop at `inspection.TINY_RUN_OVERRIDES` (BC 40 steps, Grow 48 sources x N=2, Improve I=0
    and I=1, the report), run once per session in a subprocess; its demo corpus is `<run>/../demo`. Tests
    only read it (test_notebook.py, test_rest_loop.py)."""
    from rest_jax import inspection  # pylint: disable=import-outside-toplevel

    run_dir = tmp_path_factory.getbasetemp() / "tiny_run" / "run"
    return pathlib.Path(inspection.make_tiny_run(run_dir, demo_dir=run_dir.parent / "demo"))


@pytest.fixture(scope="session")
def multi30k_dir() -> pathlib.Path:
    if not (MULTI30K_DIR / "train.de").exists():
        # In CI the data must be there: a skip would hide that the real-data tests stopped running.
        if os.environ.get("CI"):
            pytest.fail(f"Multi30k not found at {MULTI30K_DIR} (CI is set: real-data tests may not skip)")
        pytest.skip(f"Multi30k not found at {MULTI30K_DIR}")
    return MULTI30K_DIR


class _RisingReward:
    """A reward whose every call scores higher than the one before (k/1000 at the k-th call): each validation beats
    the last, so that which policy is kept depends on the selection alone (the held-out guard's tests)."""

    name, needs_reference = "rising", False

    def __init__(self):
        self.calls = 0

    def score(self, sources, candidates, references):
        del sources, references
        self.calls += 1
        return np.full(len(candidates), self.calls / 1000, np.float32)


@pytest.fixture
def rising_reward():
    """A fresh `_RisingReward` factory (call it for each run)."""
    return _RisingReward
