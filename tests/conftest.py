"""Test set-up: 8 simulated CPU devices so sharding is testable without a TPU."""

import os

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pathlib  # noqa: E402

import pytest  # noqa: E402

MULTI30K_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"


@pytest.fixture(scope="session")
def multi30k_dir() -> pathlib.Path:
    if not (MULTI30K_DIR / "train.de").exists():
        # In CI the data must be there: a skip would hide that the real-data tests stopped running.
        if os.environ.get("CI"):
            pytest.fail(f"Multi30k not found at {MULTI30K_DIR} (CI is set: real-data tests may not skip)")
        pytest.skip(f"Multi30k not found at {MULTI30K_DIR}")
    return MULTI30K_DIR
