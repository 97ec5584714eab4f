"""Improve's peak RSS against Grow store size: the streamed data path against loading the store whole.

Writes synthetic Grow stores of the IWSLT shape (N = 4 samples + the reference per source, 1,024 sources a
shard, ~20-word texts, 32-token candidates with behaviour log-probs) and, in a fresh process per measurement,
runs Improve's data path on each: the first pass (`improve_data.filter_counts`, every shard) and then
`--batches` batches of `stream_batches` (τ = 0.7, batch 64, the default 8 readers and 4,096-row buffers).
`--mode=load` measures instead what Improve did before it streamed: the store's columns loaded whole
(`GrowStore.as_numpy`). Peak RSS is the process's VmHWM, imports (jax, TF) included.

    python benchmarks/improve_memory_benchmark.py                 # 200k, 1M, 2M records, both modes
    python benchmarks/improve_memory_benchmark.py --records 200000 2000000 --modes stream
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

NUM_SAMPLES = 4
SOURCES_PER_SHARD = 1024
WORDS = ("the", "a", "house", "river", "walks", "green", "slowly", "under", "bridge", "child", "reads", "book",
         "city", "night", "light", "over", "water", "small", "old", "runs")


def write_store(directory: str, num_records: int, seed: int = 0) -> float:
    """A complete synthetic Grow store of about `num_records` records; returns seconds taken."""
    from rest_jax.data import grow_store  # pylint: disable=import-outside-toplevel

    started = time.perf_counter()
    per = NUM_SAMPLES + 1
    num_sources = max(1, num_records // per)
    writer = grow_store.GrowStoreWriter(directory, 1, num_sources, NUM_SAMPLES, sources_per_shard=SOURCES_PER_SHARD)
    rng = np.random.default_rng(seed)
    for shard in writer.pending_shards():
        records = []
        for s in writer.shard_source_ids(shard):
            source = " ".join(rng.choice(WORDS, 20))
            for j in range(-1, NUM_SAMPLES):
                text = " ".join(rng.choice(WORDS, 20))
                tokens = rng.integers(3, 32000, 32).tolist()
                records.append({"source_id": s, "sample_id": j, "is_reference": j < 0, "source_text": source,
                                "candidate_text": text, "reference_text": text,
                                "source_tokens": rng.integers(3, 32000, 32).tolist(), "candidate_tokens": tokens,
                                "reward": 1.0 if j < 0 else float(rng.uniform()),
                                "behaviour_logprobs": (-rng.uniform(size=32)).tolist()})
        writer.write_shard(shard, records)
    writer.write_metadata()
    return time.perf_counter() - started


def _measure(directory: str, mode: str, batches: int) -> dict[str, float]:
    """In this process: the data path of `mode`; returns peak RSS (MiB) and seconds."""
    from rest_jax import improve_data  # pylint: disable=import-outside-toplevel
    from rest_jax.data import grow_store  # pylint: disable=import-outside-toplevel

    started = time.perf_counter()
    if mode == "load":
        cols = grow_store.GrowStore(directory).as_numpy()
        rows = len(cols["reward"])
    else:
        data = improve_data.GrowData.open(directory)
        selection = improve_data.Selection(1, True, "threshold")
        counts = improve_data.filter_counts(data, selection)
        stream = improve_data.stream_batches(data, selection, counts, 64, {"inputs": 48, "targets": 48}, 0)
        rows = 0
        for _ in range(batches):
            rows += len(next(stream)["reward"])
    return {"peak_rss_mib": _peak_rss_mib(), "seconds": time.perf_counter() - started, "rows": rows}


def _peak_rss_mib() -> float:
    """This process's peak RSS since it started: VmHWM, not ru_maxrss, which Linux carries over from the
    parent through fork and exec (a child of a 4 GB pytest process would report 4 GB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(directory: str, mode: str, batches: int) -> dict[str, float]:
    """`_measure` in a fresh process (so earlier measurements do not raise the peak)."""
    out = subprocess.run([sys.executable, __file__, "--child", directory, "--modes", mode, "--batches",
                          str(batches)], check=True, capture_output=True, text=True,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[200_000, 1_000_000, 2_000_000])
    parser.add_argument("--modes", nargs="+", default=["stream", "load"], choices=["stream", "load"])
    parser.add_argument("--batches", type=int, default=3000, help="streamed batches of 64 (3,000: ~one epoch "
                        "of the kept rows of a 200k store)")
    parser.add_argument("--workdir", default=None, help="where the stores go and are kept for the next run "
                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child, args.modes[0], args.batches)))
        return
    print(f"# {' '.join(sys.argv)}")
    print(f"# machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    print("| records | store MiB | mode | peak RSS MiB | seconds |")
    print("| ---: | ---: | --- | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.records:
            store = os.path.join(args.workdir or tmp, f"store_{n}")
            from rest_jax.data import grow_store  # pylint: disable=import-outside-toplevel
            if not grow_store.GrowStore.is_complete(store):
                write_store(store, n)
            size = sum(os.path.getsize(os.path.join(store, f)) for f in os.listdir(store)) / 2 ** 20
            for mode in args.modes:
                r = measure(store, mode, args.batches)
                print(f"| {n:,} | {size:,.0f} | {mode} | {r['peak_rss_mib']:,.0f} | {r['seconds']:.0f} |", flush=True)

if __name__ == "__main__":
    main()
