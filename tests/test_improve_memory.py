"""Improve streams the Grow store: its peak RSS does not grow with the store (issue: multi-process, streaming).

Each measurement runs in a fresh process (benchmarks/improve_memory_benchmark.py): the first pass over every
shard and a stream of batches. The same measurement of the pre-streaming path (the store loaded whole) must
grow with the store, which shows the measurement can see growth. The 2M-record figures are in
benchmarks/README.md (`python benchmarks/improve_memory_benchmark.py`).
"""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "improve_memory_benchmark.py"
_SPEC = importlib.util.spec_from_file_location("improve_memory_benchmark", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def _rss(tmp_path, records, mode, batches=400):
    store = tmp_path / f"store_{records}"
    if not store.exists():
        bench.write_store(str(store), records)
    return bench.measure(str(store), mode, batches)


@pytest.mark.slow  # a memory property, measured like a benchmark (~1 min): the slow suite keeps it true
@pytest.mark.parametrize("small, large", [pytest.param(20_000, 200_000),
                                          pytest.param(200_000, 2_000_000, marks=pytest.mark.slow)])
def test_streamed_improve_data_keeps_peak_rss_flat(tmp_path, small, large):
    a, b = _rss(tmp_path, small, "stream"), _rss(tmp_path, large, "stream")
    assert b["peak_rss_mib"] <= 1.10 * a["peak_rss_mib"], (a, b)
    # The same measurement sees the store loaded whole grow with it.
    whole_a, whole_b = _rss(tmp_path, small, "load"), _rss(tmp_path, large, "load")
    assert whole_b["peak_rss_mib"] > 1.10 * whole_a["peak_rss_mib"], (whole_a, whole_b)
