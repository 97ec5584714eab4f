"""Decode throughput and memory: rest_jax temperature sampling vs Hugging Face `generate` (PyTorch CPU).

ReST's Grow step (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 2) is N-sample temperature sampling, so this
is the cost that dominates a ReST run. In one process, on the same configuration (the repository's gin model
files) and the same random weights (exported to HF with `rest_jax.convert.params_to_hf`), it times:

* rest_jax: `rest_jax.decoding.sample` (temperature 1, no top-k/top-p, `ignore_eos=True` so every row emits
  exactly L tokens), jitted; the first call (tracing + XLA compile) is reported apart.
* HF: `T5ForConditionalGeneration.generate(do_sample=True, num_return_sequences=N, top_k=0,
  min_new_tokens=L, max_new_tokens=L)` under `torch.inference_mode()`, after a warm-up call.

Memory is the peak resident-set growth during one timed call over the RSS just before it, sampled by a
psutil thread every millisecond (both frameworks allocate decode buffers per call and release them after).
GFLOP/s counts the model's useful FLOPs (matmuls and attention over the causal prefix; encoder and
cross-attention K/V once per source) for both implementations, against this machine's float32 matmul peak
measured in the same run (best of a few jitted 4096x4096 `jnp.dot`).

Usage:
  python benchmarks/decode_benchmark.py                         # tiny + IWSLT shapes, N sweep 1,4,8,16
  python benchmarks/decode_benchmark.py --shapes tiny --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import flax.linen as nn  # noqa: E402
import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from rest_jax import decoding  # noqa: E402
from rest_jax import metrics  # noqa: E402
from rest_jax.model.t5 import T5Config, Transformer, init_params  # noqa: E402

SHAPES = {"tiny": "models/tiny.gin", "iwslt": "models/rest_iwslt.gin"}


# ---------------------------------------------------------------------------------------------------------
# Measurement helpers


class PeakRSS:
    """Peak RSS growth (bytes) over the value at entry, sampled by a background thread."""

    def __init__(self, interval_s: float = 0.001):
        self._proc = psutil.Process()
        self._interval = interval_s
        self.delta = 0

    def __enter__(self):
        self._base = self._proc.memory_info().rss
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.delta = self._peak - self._base


def timed(fn: Callable[[], Any], repeats: int, cpu: list[float] | None = None) -> tuple[list[float], int]:
    """Wall times of `repeats` calls and the largest peak-RSS growth among them.

    When `cpu` is given, the process CPU time (all threads) of each call is appended to it: on a shared
    machine it moves less with other jobs' load than wall time does.
    """
    times, peak = [], 0
    for _ in range(repeats):
        with PeakRSS() as mem:
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times.append(time.perf_counter() - start)
            if cpu is not None:
                cpu.append(time.process_time() - start_cpu)
        peak = max(peak, mem.delta)
    return times, peak


def matmul_peak_gflops(n: int = 4096, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = min(timed(lambda: dot(a, a).block_until_ready(), repeats)[0])
    return 2 * n**3 / best / 1e9


def torch_matmul_peak_gflops(n: int = 4096, repeats: int = 5) -> float:
    """The same measurement for PyTorch's CPU sgemm, which HF's generate runs on."""
    import torch  # pylint: disable=g-import-not-at-top

    a = torch.randn(n, n)
    torch.mm(a, a)
    best = min(timed(lambda: torch.mm(a, a), repeats)[0])
    return 2 * n**3 / best / 1e9


def machine_description() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {os.cpu_count()} logical cores ({usable} usable), {platform.system()} {platform.release()}"


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


# ---------------------------------------------------------------------------------------------------------
# The two implementations


def load_config(shape: str) -> T5Config:
    gin.clear_config()
    # Parse from configs/ so that gin resolves the files' `include`s without logging failed look-ups.
    with contextlib.chdir(REPO / "configs"):
        gin.parse_config_files_and_bindings([SHAPES[shape]], [])
    config = T5Config()
    gin.clear_config()
    return config


def hf_model(config: T5Config, params: Any):
    """The HF model with our weights, through the converter's export and HF's own loader."""
    import transformers  # pylint: disable=g-import-not-at-top

    from rest_jax import convert  # pylint: disable=g-import-not-at-top

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        convert.save_hf_checkpoint(config, params, os.path.join(tmp, "model"))
        model = transformers.T5ForConditionalGeneration.from_pretrained(os.path.join(tmp, "model"))
    return model.eval()


def check_same_weights(config, params, model, sources) -> float:
    """Max |logit difference| of the two implementations on one teacher-forced batch."""
    import torch  # pylint: disable=g-import-not-at-top

    targets = np.asarray(sources[:4, :8])
    ours = Transformer(config).apply({"params": params}, jnp.asarray(sources[:4]),
                                     decoding.shift_right(jnp.asarray(targets)))
    with torch.inference_mode():
        src = torch.tensor(np.asarray(sources[:4]), dtype=torch.long)
        theirs = model(input_ids=src, attention_mask=(src > 0).long(),
                       decoder_input_ids=torch.tensor(np.asarray(decoding.shift_right(targets)),
                                                      dtype=torch.long)).logits.numpy()
    return float(np.abs(np.asarray(ours) - theirs).max())


def run_ours(params, config, sources, samples, new_tokens, repeats):
    src = jnp.asarray(sources)
    counter = iter(range(10**6))

    def call():
        out = decoding.sample(params, config, src, jax.random.PRNGKey(next(counter)), num_samples=samples,
                              max_decode_len=new_tokens, temperature=1.0, ignore_eos=True)
        jax.block_until_ready(out)
        return out

    start = time.perf_counter()
    out = call()
    first = time.perf_counter() - start
    assert out.tokens.shape == (len(sources), samples, new_tokens)
    assert int(out.lengths.min()) == new_tokens
    cpu = []
    times, mem = timed(call, repeats, cpu)
    return first, times, mem, min(cpu)


def run_hf(model, sources, samples, new_tokens, repeats):
    import torch  # pylint: disable=g-import-not-at-top

    src = torch.tensor(np.asarray(sources), dtype=torch.long)
    kwargs = dict(attention_mask=(src > 0).long(), do_sample=True, num_return_sequences=samples,
                  temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=new_tokens, max_new_tokens=new_tokens)

    def call():
        with torch.inference_mode():
            out = model.generate(input_ids=src, **kwargs)
        assert out.shape == (len(sources) * samples, new_tokens + 1), out.shape
        return out

    start = time.perf_counter()
    with torch.inference_mode():  # warm-up: small call, excluded from timing
        model.generate(input_ids=src[:1], **dict(kwargs, attention_mask=kwargs["attention_mask"][:1],
                                                   min_new_tokens=2, max_new_tokens=2))
    first = time.perf_counter() - start
    cpu = []
    times, mem = timed(call, repeats, cpu)
    return first, times, mem, min(cpu)


# ---------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "iwslt"], choices=sorted(SHAPES))
    parser.add_argument("--sources", type=int, default=32)
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("--source_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (best reported)")
    parser.add_argument("--hf_repeats", type=int, default=None, help="default: --repeats")
    parser.add_argument("--sweep", type=str, default="1,4,8,16", help="N values for cost per sample ('' = off)")
    parser.add_argument("--sweep_hf", action="store_true", help="also time HF in the N sweep (slow)")
    parser.add_argument("--no_hf", action="store_true")
    args = parser.parse_args(argv)
    hf_repeats = args.hf_repeats or args.repeats

    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    print("# rest_jax decode benchmark")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"machine: {machine_description()}")
    print(f"software: jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s)), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"python {platform.python_version()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"{load()} at start")
    peak = matmul_peak_gflops()
    print(f"float32 matmul peak (jitted 4096x4096 jnp.dot, best of 5): {peak:.1f} GFLOP/s; "
          f"PyTorch torch.mm on the same: {torch_matmul_peak_gflops():.1f} GFLOP/s")
    b, n, s, steps = args.sources, args.num_samples, args.source_len, args.new_tokens
    print(f"work: {b} sources x N={n} samples, {s} source tokens, {steps} new tokens "
          f"(= {b * n * steps} generated tokens per call), temperature 1, no top-k/top-p, float32; "
          f"times are the best of {args.repeats} (rest_jax) / {hf_repeats} (HF) calls after warm-up")
    print("memory: peak RSS growth during one timed call over RSS before it (psutil, sampled every 1 ms)\n")

    rows, sweep_rows = [], []
    for shape in args.shapes:
        config = load_config(shape)
        params = jax.jit(lambda rng, c=config: nn.unbox(init_params(Transformer(c), rng)))(jax.random.PRNGKey(0))
        rng = np.random.default_rng(0)
        sources = rng.integers(2, config.vocab_size, (b, s)).astype(np.int32)
        flops = metrics.estimate_decode_flops(config, b, n, s, steps)
        print(f"[{shape}] {SHAPES[shape]}: {config.num_encoder_layers}+{config.num_decoder_layers} layers, "
              f"d_model {config.emb_dim}, ffn {config.mlp_dim}, {config.num_heads} heads x {config.head_dim}, "
              f"vocab {config.vocab_size}; {flops / 1e9:.1f} GFLOP per call", flush=True)

        first, times, mem, cpu = run_ours(params, config, sources, n, steps, args.repeats)
        best = min(times)
        ours = dict(shape=shape, impl="rest_jax", first=first, best=best, median=statistics.median(times), mem=mem,
                    tps=b * n * steps / best, gflops=flops / best / 1e9, cpu=cpu)
        rows.append(ours)
        print(f"  rest_jax: first call {first:.2f} s, best {best:.3f} s, {ours['tps']:.0f} tok/s ({load()})",
              flush=True)
        if not args.no_hf:
            model = hf_model(config, params)
            print(f"  same weights: max |logit diff| HF vs rest_jax = "
                  f"{check_same_weights(config, params, model, sources):.2e}", flush=True)
            first, times, mem, cpu = run_hf(model, sources, n, steps, hf_repeats)
            best = min(times)
            hf = dict(shape=shape, impl="HF generate", first=first, best=best, median=statistics.median(times),
                      mem=mem, tps=b * n * steps / best, gflops=flops / best / 1e9, cpu=cpu)
            rows.append(hf)
            print(f"  HF: warm-up {first:.2f} s, best {best:.3f} s, {hf['tps']:.0f} tok/s ({load()})", flush=True)

        for samples in [int(x) for x in args.sweep.split(",") if x]:
            first, times, _, cpu = run_ours(params, config, sources, samples, steps, args.repeats)
            row = dict(shape=shape, n=samples, ours=min(times) / (b * samples), cpu=cpu / (b * samples),
                       compile=first)
            if args.sweep_hf and not args.no_hf:
                _, times, _, _ = run_hf(model, sources, samples, steps, hf_repeats)
                row["hf"] = min(times) / (b * samples)
            sweep_rows.append(row)
            print(f"  N={samples}: {row['ours'] * 1e3:.2f} ms per sample ({row['cpu'] * 1e3:.2f} CPU ms)", flush=True)
        print()

    print(f"## Throughput ({b} sources x N={n}, {s} source tokens, {steps} new tokens)\n")
    print("| shape | implementation | tokens/s | best s/call | median s/call | CPU s/call | first call s "
          "| peak RSS delta MiB | GFLOP/s | % of matmul peak | speed-up vs HF (wall / CPU) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        hf = next((r for r in rows if r["shape"] == row["shape"] and r["impl"] == "HF generate"), None)
        ratio = f"{row['tps'] / hf['tps']:.2f}x / {hf['cpu'] / row['cpu']:.2f}x" if hf else "-"
        print(f"| {row['shape']} | {row['impl']} | {row['tps']:.0f} | {row['best']:.3f} | {row['median']:.3f} | "
              f"{row['cpu']:.3f} | {row['first']:.2f} | {row['mem'] / 2**20:.0f} | {row['gflops']:.1f} | "
              f"{100 * row['gflops'] / peak:.1f} | {ratio} |")
    if sweep_rows:
        print(f"\n## Cost per sample vs N ({b} sources, {steps} new tokens; encode once per source)\n")
        has_hf = any("hf" in r for r in sweep_rows)
        print("| shape | N | rest_jax ms/sample | rest_jax CPU ms/sample | first call s |"
              + (" HF ms/sample |" if has_hf else ""))
        print("|---|---:|---:|---:|---:|" + ("---:|" if has_hf else ""))
        for r in sweep_rows:
            extra = f" {r['hf'] * 1e3:.2f} |" if "hf" in r else (" - |" if has_hf else "")
            print(f"| {r['shape']} | {r['n']} | {r['ours'] * 1e3:.2f} | {r['cpu'] * 1e3:.2f} | {r['compile']:.2f} |"
                  + extra)
    print(f"\n{load()} at end; matmul peak {peak:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
