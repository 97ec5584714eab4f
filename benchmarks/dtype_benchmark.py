"""float32 vs bfloat16 activations: Grow (sampling) and Improve (train step) against each dtype's peak and HF.

Issue 16's benchmark, in one run on one machine. Activations in bfloat16 (`T5Config.dtype`, gin macro
ACTIVATION_DTYPE) with float32 parameters, optimizer state, attention softmax, logits and loss, as T5X runs on
TPU; CPUs with AVX512-BF16 run XLA's bfloat16 matmul about twice as fast as float32, so the peak itself moves.
It measures, each in its own subprocess (peak RSS is that measurement's alone):

* the jitted 2048^3 matmul peak of jax in float32 and in bfloat16 (float32 accumulation,
  `preferred_element_type=float32`), and PyTorch's float32 `torch.mm`;
* Grow: `rest_jax.decoding.sample` (temperature 1, `ignore_eos`: every row emits L tokens) in each dtype, and
  HF `generate` in float32 on the same random weights (`decode_benchmark.run_hf`);
* Improve: one AdamW train step (forward, backward, update; `train_benchmark.worker_jax`) in each dtype, and HF
  transformers in float32 (`train_benchmark.worker_torch`).

GFLOP/s count the model's useful FLOPs (`rest_jax.metrics.estimate_decode_flops`,
`estimate_flops_per_example`), the same for every row; "% of peak" is over the peak of the
row's own dtype (HF: the float32 peak of the faster of jax and torch). Times are the best of `--repeats` calls
after a warm-up; first calls (compile) are printed apart. The machine may be shared: the load average is
printed at start and end.

    python benchmarks/dtype_benchmark.py                    # IWSLT shape (~6 min on 2 cores)
    python benchmarks/dtype_benchmark.py --shape tiny --repeats 1 --steps 2
    python benchmarks/dtype_benchmark.py --accelerator      # on a GPU/TPU: MFU (benchmarks/accelerator_check.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DTYPES = ("float32", "bfloat16")


def worker_peak(dtype: str, with_torch: str) -> dict:
    """Best matmul GFLOP/s of jax in `dtype` (float32 accumulation, as the stage summaries measure it) on
    JAX's default device: 2048^3 on a CPU, 8192^3 on an accelerator (a small product leaves a GPU idle); for
    float32 on a CPU with `with_torch`, torch's too. On an accelerator also its bf16 spec-sheet peak and name."""
    import jax

    import train_benchmark as train
    from rest_jax import metrics

    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    out = {"device": device.device_kind, "platform": device.platform,
           "jax_gflops": metrics.measured_matmul_peak(dtype, size=2048 if on_cpu else 8192, repeats=5,
                                                      backend=device.platform) / 1e9}
    if not on_cpu:
        spec = metrics.peak_flops_per_device(device.device_kind)
        out["spec_gflops"] = spec / 1e9 if spec else None
    if dtype == "float32" and on_cpu and with_torch == "1":
        out["torch_gflops"] = train.worker_peak()["torch_gflops"]
    return out


def _device_peak_mb() -> float | None:
    """Peak bytes in use on JAX's first device (accelerators report it; a CPU does not), in MB."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def worker_grow(impl: str, dtype: str, shape: str, sources: int, samples: int, length: int, repeats: int) -> dict:
    """Sampling throughput of rest_jax (in `dtype`) or HF generate (float32) on the same random weights."""
    import flax.linen as nn
    import jax
    import numpy as np

    import decode_benchmark as decode
    import train_benchmark as train
    from rest_jax import metrics
    from rest_jax.model.t5 import Transformer, init_params

    config = decode.load_config(shape)
    params = jax.jit(lambda rng: nn.unbox(init_params(Transformer(config), rng)))(jax.random.key(0))
    src = np.random.default_rng(0).integers(2, config.vocab_size, (sources, length)).astype(np.int32)
    train._reset_peak_rss()
    base = train._rss_mb("VmRSS")
    if impl == "jax":
        first, times, _, cpu = decode.run_ours(params, config.replace(dtype=dtype), src, samples, length, repeats)
    else:
        first, times, _, cpu = decode.run_hf(decode.hf_model(config, params), src, samples, length, repeats)
    best = min(times)
    flops = metrics.estimate_decode_flops(config, sources, samples, length, length)
    return {"tokens_per_s": sources * samples * length / best, "gflops_per_s": flops / best / 1e9,
            "first_s": first, "peak_rss_mb": train._rss_mb("VmHWM"), "work_mb": train._rss_mb("VmHWM") - base,
            "cpu_s": cpu, "device_peak_mb": _device_peak_mb() if impl == "jax" else None}


def worker_improve(impl: str, dtype: str, shape: str, batch: int, length: int, steps: int) -> dict:
    import train_benchmark as train

    if impl == "jax":
        r = train.worker_jax(shape, batch, length, length, 2, steps, dtype=dtype)
    else:
        r = train.worker_torch(shape, batch, length, length, 2, steps)
    return {"tokens_per_s": r["tokens_per_s"], "gflops_per_s": r["gflops_per_s"], "first_s": r["warmup_s"],
            "peak_rss_mb": r["peak_rss_mb"], "work_mb": r["train_mb"], "cpu_s": r["cpu_step_s"],
            "loss": (r["first_loss"], r["last_loss"]), "device_peak_mb": _device_peak_mb() if impl == "jax" else None}


def table(rows: list[dict], spec_peak: float | None) -> str:
    """The markdown table of `rows` (one per stage, implementation and dtype); with `spec_peak` (an
    accelerator's bf16 spec-sheet GFLOP/s) also MFU over it, as T5X and MaxText report it, and the device's
    peak memory."""
    def ratio(r, impl, dtype):
        other = next((o for o in rows if o["stage"] == r["stage"] and o["impl"] == impl and o["dtype"] == dtype), None)
        return f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}x" if other else "-"

    extra = ["MFU (bf16 spec)", "device peak MB"] if spec_peak else []
    lines = ["| stage | implementation | activations | tokens/s | GFLOP/s | % of the dtype's peak | peak RSS MB | "
             + "".join(f"{e} | " for e in extra) + "vs rest_jax float32 | vs HF float32 |",
             "|---|---|---|---:|---:|---:|---:|" + "---:|" * len(extra) + "---:|---:|"]
    for r in rows:
        cells = ([f"{100 * r['gflops_per_s'] / spec_peak:.1f}%",
                  f"{r['device_peak_mb']:,.0f}" if r.get("device_peak_mb") else "-"] if spec_peak else [])
        lines.append(f"| {r['stage']} | {r['impl']} | {r['dtype']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['gflops_per_s']:.1f} | {100 * r['of_peak']:.1f}% | {r['peak_rss_mb']:,.0f} | "
                     + "".join(f"{c} | " for c in cells)
                     + f"{ratio(r, 'rest_jax', 'float32')} | {ratio(r, 'HF transformers', 'float32')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="iwslt", choices=("tiny", "iwslt"))
    parser.add_argument("--sources", type=int, default=32, help="Grow: sources per call")
    parser.add_argument("--num_samples", type=int, default=8, help="Grow: samples per source")
    parser.add_argument("--length", type=int, default=32, help="source and target tokens (both stages)")
    parser.add_argument("--batch", type=int, default=64, help="Improve: rows per step")
    parser.add_argument("--repeats", type=int, default=3, help="Grow: timed calls (best shown)")
    parser.add_argument("--steps", type=int, default=4, help="Improve: timed steps (median shown)")
    parser.add_argument("--no_hf", action="store_true")
    parser.add_argument("--accelerator", action="store_true",
                        help="run rest_jax on JAX's default device (GPU/TPU) instead of the CPU; no HF rows")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        kind, *rest = args.worker
        if kind == "peak":
            result = worker_peak(rest[0], rest[1])
        elif kind == "grow":
            result = worker_grow(rest[0], rest[1], rest[2], *map(int, rest[3:]))
        else:
            result = worker_improve(rest[0], rest[1], rest[2], *map(int, rest[3:]))
        print("RESULT " + json.dumps(result), flush=True)
        return

    import train_benchmark as train  # pylint: disable=import-outside-toplevel  (this script's folder)

    with_hf = not (args.no_hf or args.accelerator)

    def _run(worker_args: list[str]) -> dict:
        # One device: the CPU with the default threads, or with --accelerator JAX's default (GPU/TPU).
        return train._run_worker(worker_args, script=__file__, accelerator=args.accelerator)

    command = "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:])
    print(f"command: {command}\nmachine: {train._machine()}\nload average at start: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    peaks = {dtype: _run(["peak", dtype, "1" if with_hf else "0"]) for dtype in DTYPES}
    peak = {"float32": max(peaks["float32"]["jax_gflops"], peaks["float32"].get("torch_gflops") or 0.0),
            "bfloat16": peaks["bfloat16"]["jax_gflops"]}
    spec_peak = peaks["bfloat16"].get("spec_gflops")  # accelerators: the chip's dense bf16 spec-sheet peak
    torch_peak = peaks["float32"].get("torch_gflops")
    print(f"device: {peaks['float32']['device']} ({peaks['float32']['platform']})\n"
          f"matmul peak {'2048' if peaks['float32']['platform'] == 'cpu' else '8192'}^3, GFLOP/s: float32 jax "
          f"{peaks['float32']['jax_gflops']:.1f}" + (f", torch {torch_peak:.1f}" if torch_peak else "") +
          f"; bfloat16 (float32 accumulation) jax {peak['bfloat16']:.1f} -> bfloat16/float32 "
          f"{peak['bfloat16'] / peak['float32']:.2f}x" + (f"; spec sheet bf16 {spec_peak:,.0f}" if spec_peak else ""),
          flush=True)
    grow_spec = [args.shape, str(args.sources), str(args.num_samples), str(args.length), str(args.repeats)]
    improve_spec = [args.shape, str(args.batch), str(args.length), str(args.steps)]
    runs = [(stage, impl, dtype) for stage in ("Grow", "Improve")
            for impl, dtype in (("jax", "float32"), ("jax", "bfloat16"), ("hf", "float32"))
            if impl == "jax" or with_hf]
    rows = []
    for stage, impl, dtype in runs:
        spec = grow_spec if stage == "Grow" else improve_spec
        r = _run([stage.lower(), impl, dtype, *spec])
        r.update(stage=stage, impl="rest_jax" if impl == "jax" else "HF transformers", dtype=dtype,
                 of_peak=r["gflops_per_s"] / peak[dtype])
        rows.append(r)
        print(f"  {stage} {r['impl']} {dtype}: {r['tokens_per_s']:.0f} tokens/s (first call {r['first_s']:.1f} s)",
              flush=True)

    print(f"\n{args.shape} shape; Grow: {args.sources} sources x N={args.num_samples}, {args.length} source and "
          f"{args.length} new tokens, best of {args.repeats}; Improve: AdamW step, {args.batch} x {args.length} x "
          f"{args.length}, median of {args.steps}\n")
    print(table(rows, spec_peak))
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for r in rows:
        if "loss" in r:
            print(f"  Improve {r['impl']} {r['dtype']}: loss {r['loss'][0]:.3f} -> {r['loss'][1]:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "peaks": peaks, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
