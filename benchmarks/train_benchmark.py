"""Train-step throughput and peak memory: rest_jax vs Hugging Face transformers T5 (PyTorch, CPU).

Same configuration, batch and optimizer on both sides: a T5 v1.1 encoder-decoder (gated GELU, untied
logits, no dropout) from a rest_jax model gin file, AdamW (lr 1e-4, weight decay 0.01 on every parameter,
eps 1e-8), plain token cross entropy (no label smoothing, no z-loss), one fixed batch of B x S source and
B x T target tokens (all real tokens), forward + backward + update, the loss fetched to the host every
step (as the training loop does). Data loading is not timed.

    python benchmarks/train_benchmark.py                      # tiny and IWSLT shapes, 64 x 32 x 32
    python benchmarks/train_benchmark.py --shapes tiny --steps 50

Each measurement runs in its own subprocess so that peak memory is that framework's alone: "peak RSS" is
the process's high-water mark while building the model and training; "train MB" is that minus the resident size after
imports (the high-water mark is reset there through /proc/self/clear_refs). Achieved GFLOP/s counts the
matmul FLOPs of `rest_jax.metrics.estimate_flops_per_example` (the same count for both frameworks) at the median step time and is
shown as a fraction of this machine's float32 matmul peak, measured in the same run: the best of jax and
torch on a 2048^3 matmul, with all cores or (as other jobs steal cores) cores x the one-thread figure. The machine is shared: the script alternates the frameworks (--repeats), shows the best run of each and all
runs' figures, and prints the load average before and after. The last columns use process CPU time
per step (all threads), which other jobs' load disturbs less: throughput per CPU-second used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"tiny": "configs/models/tiny.gin", "iwslt": "configs/models/rest_iwslt.gin"}
LR, WEIGHT_DECAY, EPS = 1e-4, 0.01, 1e-8


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _model_config(shape: str):
    import gin

    from rest_jax.model import t5

    gin.clear_config()
    gin.add_config_file_search_path(os.path.join(REPO, "configs"))
    gin.parse_config_files_and_bindings([os.path.join(REPO, SHAPES[shape])], [], skip_unknown=True,
                                        finalize_config=False)  # unlocked: modules imported later register
    return t5.T5Config()


def _batch(vocab: int, batch: int, src: int, tgt: int):
    import numpy as np

    rng = np.random.default_rng(0)
    enc = rng.integers(3, vocab, size=(batch, src)).astype(np.int32)
    enc[:, -1] = 1
    targets = rng.integers(3, vocab, size=(batch, tgt)).astype(np.int32)
    targets[:, -1] = 1
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    return enc, dec_in, targets


def adamw_step(model, host_batch: dict, loss_fn=None):
    """(train state, jitted AdamW step, the batch on the device) of `model` on one CPU device: this benchmark's
    optimizer (lr 1e-4 constant, weight decay on every parameter) and `loss_fn` (default: plain cross entropy of
    an encoder-decoder batch, `losses.make_loss_fn`)."""
    import jax

    from rest_jax import losses, optim, partitioning, trainer

    mesh = partitioning.create_mesh((1, 1), devices=jax.devices()[:1])
    rules = partitioning.standard_logical_axis_rules()
    opt = optim.create_optimizer(
        lambda learning_rate: optim.adamw(learning_rate, eps=EPS, weight_decay=WEIGHT_DECAY, decay_matrices_only=False),
        schedule=optim.learning_rate_schedule("constant", LR, 0))
    state, shardings = trainer.init_train_state(model, opt, jax.random.key(0), mesh, rules)
    loss_fn = loss_fn or losses.make_loss_fn(model, label_smoothing=0.0, z_loss=0.0)
    step = trainer.make_train_step(opt, loss_fn, mesh=mesh,
                                   rules=rules, state_shardings=shardings)
    return state, step, partitioning.shard_batch(host_batch, mesh, rules)


def worker_jax(shape: str, batch: int, src: int, tgt: int, warmup: int, steps: int, dtype: str = "float32") -> dict:
    import jax
    import numpy as np

    from rest_jax import metrics
    from rest_jax.model import t5

    os.chdir(REPO)
    config = _model_config(shape).replace(dtype=dtype)  # activations; parameters and AdamW state stay float32
    enc, dec_in, targets = _batch(config.vocab_size, batch, src, tgt)
    _reset_peak_rss()
    base = _rss_mb("VmRSS")
    host = {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": targets,
            "decoder_loss_weights": np.ones(targets.shape, np.float32)}
    state, step, device_batch = adamw_step(t5.Transformer(config), host)
    t0 = time.perf_counter()
    for _ in range(warmup):
        state, m = step(state, device_batch)
        jax.device_get(m["loss"])
    compile_s = time.perf_counter() - t0
    losses, times, cpu = [], [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, m = step(state, device_batch)
        losses.append(float(jax.device_get(m["loss"])))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return _result("rest_jax (jax.jit, XLA CPU)", config, batch, src, tgt, times, cpu, base, losses,
                   compile_s=compile_s, flops=metrics.estimate_flops_per_example(config, src, tgt) * batch)


def worker_torch(shape: str, batch: int, src: int, tgt: int, warmup: int, steps: int) -> dict:
    import torch
    import transformers

    from rest_jax import metrics

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    torch.manual_seed(0)
    config = _model_config(shape)
    enc, dec_in, targets = _batch(config.vocab_size, batch, src, tgt)
    assert tuple(config.mlp_activations) == ("gelu", "linear") and not config.logits_via_embedding
    _reset_peak_rss()
    base = _rss_mb("VmRSS")
    hf_config = transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim, d_ff=config.mlp_dim,
        num_layers=config.num_encoder_layers, num_decoder_layers=config.num_decoder_layers,
        num_heads=config.num_heads, relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance, dropout_rate=0.0,
        layer_norm_epsilon=config.layer_norm_epsilon, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(hf_config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS)
    enc_t, dec_t, tgt_t = (torch.from_numpy(x).long() for x in (enc, dec_in, targets))
    mask = enc_t > 0

    def one_step() -> float:
        out = model(input_ids=enc_t, attention_mask=mask, decoder_input_ids=dec_t, labels=tgt_t)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.item())

    warm_s, losses, times, cpu = time_calls(one_step, warmup, steps)
    return _result(f"HF transformers {transformers.__version__} (PyTorch {torch.__version__} eager)", config,
                   batch, src, tgt, times, cpu, base, losses, compile_s=warm_s,
                   flops=metrics.estimate_flops_per_example(config, src, tgt) * batch)


def time_calls(fn, warmup: int, steps: int) -> tuple[float, list, list[float], list[float]]:
    """`warmup` untimed calls of `fn` (their total seconds), then `steps` timed ones: (warm-up seconds, results,
    wall seconds, process CPU seconds per call)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    warm_s = time.perf_counter() - t0
    results, times, cpu = [], [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        results.append(fn())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return warm_s, results, times, cpu


def _result(name, config, batch, src, tgt, times, cpu, base_mb, losses, compile_s, flops) -> dict:
    import numpy as np

    peak = _rss_mb("VmHWM")
    name += f", {os.environ.get('BENCH_THREADS', os.cpu_count())} thread(s)"
    # The median step: robust to bursts of load from the machine's other users.
    step_s = float(np.median(times))
    return {"framework": name, "step_s": step_s, "min_step_s": float(np.min(times)),
            "mean_step_s": float(np.mean(times)), "tokens_per_s": batch * tgt / step_s,
            "cpu_step_s": float(np.median(cpu)), "tokens_per_cpu_s": batch * tgt / float(np.median(cpu)),
            "gflops_per_s": flops / step_s / 1e9, "peak_rss_mb": peak, "train_mb": peak - base_mb,
            "warmup_s": compile_s, "first_loss": losses[0], "last_loss": losses[-1],
            "vocab": config.vocab_size}


def worker_peak(size: int = 2048, reps: int = 5) -> dict:
    """Best float32 matmul GFLOP/s of jax and torch with BENCH_THREADS threads (default all cores)."""
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    flops = 2.0 * size ** 3
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    best_jax = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(a, a).block_until_ready()
        best_jax = max(best_jax, flops / (time.perf_counter() - t0))
    ta = torch.randn(size, size)
    torch.mm(ta, ta)
    best_torch = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(ta, ta)
        best_torch = max(best_torch, flops / (time.perf_counter() - t0))
    return {"jax_gflops": best_jax / 1e9, "torch_gflops": best_torch / 1e9,
            "peak_gflops": max(best_jax, best_torch) / 1e9}


def _run_worker(args: list[str], threads: int | None = None, script: str = __file__,
                accelerator: bool = False) -> dict:
    """Runs `script --worker ARGS` (a measurement) in a fresh process and returns the dict it prints;
    `threads` caps the framework's intra-op threads. The worker sees no GPU unless `accelerator`."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    if not accelerator:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("XLA_FLAGS", None)  # one CPU device (no simulated devices)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), BENCH_THREADS=str(threads))
        if threads == 1:
            env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", *args], env=env,
                          capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {args} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def _machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,iwslt")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--src", type=int, default=32)
    parser.add_argument("--tgt", type=int, default=32)
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: 30 tiny, 4 iwslt)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per framework; best is shown")
    parser.add_argument("--threads", default="both", help="intra-op threads: 'both' (1 core and all cores, best "
                        "shown) or a number")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        if os.environ.get("BENCH_THREADS") == "1":
            # Pin to one core: XLA's CPU runtime runs independent ops concurrently even with its
            # intra-op flags at 1, so only affinity makes "1 thread" mean one core for both frameworks.
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        kind, *rest = args.worker
        if kind == "peak":
            result = worker_peak()
        else:
            shape, batch, src, tgt, warmup, steps = rest[0], *map(int, rest[1:])
            result = (worker_jax if kind == "jax" else worker_torch)(shape, batch, src, tgt, warmup, steps)
        print("RESULT " + json.dumps(result), flush=True)
        return

    command = "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:])
    load_before = os.getloadavg()
    print(f"command: {command}\nmachine: {_machine()}\nload average before: "
          f"{' '.join(f'{x:.2f}' for x in load_before)}", flush=True)
    # Other jobs steal cores from a multi-threaded matmul, so the machine's peak is also estimated as
    # cores x the one-core peak; the larger estimate is used.
    cores = os.cpu_count() or 1
    all_cores, one_core = _run_worker(["peak"]), _run_worker(["peak"], threads=1)  # the latter pinned to a core
    peak = {"all_cores": all_cores, "one_core": one_core,
            "peak_gflops": max(all_cores["peak_gflops"], cores * one_core["peak_gflops"])}
    print(f"float32 matmul (2048^3), GFLOP/s: {cores} threads: jax {all_cores['jax_gflops']:.1f}, torch "
          f"{all_cores['torch_gflops']:.1f}; 1 thread: jax {one_core['jax_gflops']:.1f}, torch "
          f"{one_core['torch_gflops']:.1f} -> machine peak {peak['peak_gflops']:.1f}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        steps = args.steps or (30 if shape == "tiny" else 4)
        spec = [shape, str(args.batch), str(args.src), str(args.tgt), str(args.warmup), str(steps)]
        runs = {"jax": [], "torch": []}
        # Alternate frameworks and thread counts, so that a burst of load hits all alike. On a loaded
        # machine one thread can beat all cores (PyTorch's OpenMP threads spin-wait for descheduled peers).
        thread_counts = sorted({1, os.cpu_count() or 1}) if args.threads == "both" else [int(args.threads)]
        for _ in range(args.repeats):
            for threads in thread_counts:
                for kind in runs:
                    runs[kind].append(_run_worker([kind, *spec], threads))
        # Best of the repeats: the run least disturbed by the other users of the machine.
        jax_r, torch_r = (max(runs[k], key=lambda r: r["tokens_per_s"]) for k in ("jax", "torch"))
        for r, kind in ((jax_r, "jax"), (torch_r, "torch")):
            r["all_tokens_per_s"] = [round(x["tokens_per_s"], 1) for x in runs[kind]]
        for r in (jax_r, torch_r):
            r.update(shape=shape, steps=steps, fraction_of_peak=r["gflops_per_s"] / peak["peak_gflops"])
        jax_r["speedup"] = jax_r["tokens_per_s"] / torch_r["tokens_per_s"]
        jax_r["cpu_speedup"] = jax_r["tokens_per_cpu_s"] / torch_r["tokens_per_cpu_s"]
        rows += [jax_r, torch_r]
        print(f"  {shape}: done", flush=True)
    load_after = os.getloadavg()
    header = (f"\nbatch {args.batch} x {args.src} source x {args.tgt} target tokens, AdamW, float32\n"
              "| shape | framework | target tokens/s | step ms (median / min) | GFLOP/s | of peak | peak RSS MB | "
              "train MB | vs HF | CPU s/step | tokens per CPU-s vs HF |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(header)
    for r in rows:
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "1.00x"
        print(f"| {r['shape']} | {r['framework']} | {r['tokens_per_s']:.0f} | {1000 * r['step_s']:.1f} / {1000 * r['min_step_s']:.1f} | "
              f"{r['gflops_per_s']:.1f} | {100 * r['fraction_of_peak']:.1f}% | {r['peak_rss_mb']:.0f} | "
              f"{r['train_mb']:.0f} | {speed} | {r['cpu_step_s']:.3f} | "
              f"{r.get('cpu_speedup', 1.0):.2f}x |")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in load_after)} "
          "(1, 5, 15 min; the machine is shared, so absolute figures move with it)")
    for r in rows:
        print(f"  {r['shape']} {r['framework'].split(' (')[0]}: tokens/s of each run {r['all_tokens_per_s']}, "
              f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, warm-up {r['warmup_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "machine": _machine(), "load_before": load_before,
                       "load_after": load_after, "peak": peak, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
