"""Grow samples/s and Improve tokens/s as P JAX processes x K devices on one machine (`rest_jax launch`).

A pod runs one process per host; this measures what the multi-process code path costs against one process
with the same number of devices, on the same CPU: Grow (sampling N per source, scoring with sentence chrF,
writing the store; each process samples its own shards, then the metadata barrier) and the Improve train step
(BC loss, AdamW; the global batch split into one block of rows per process, gradients all-reduced across
processes by gloo). Random-init weights, a SentencePiece vocabulary trained on the demo corpus, full-length
samples (no early EOS).

  python benchmarks/multiprocess_benchmark.py [--shape rest_iwslt|tiny] [--layouts 1x8,2x4,4x2]
      [--sources 64] [--samples 8] [--length 32] [--batch 64] [--steps 5]
"""

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = "MULTIPROCESS_BENCHMARK_RESULT "


def child(args: argparse.Namespace) -> None:
    """One process of the job: Grow, then Improve steps; process 0 prints the figures."""
    from rest_jax import partitioning

    partitioning.initialize_multihost()
    import gin
    import jax
    import numpy as np

    from rest_jax import decoding, grow, losses, optim, trainer
    from rest_jax import policy as policy_lib
    from rest_jax.data import demo_corpus
    from rest_jax.data import vocab as vocab_lib
    from rest_jax.model import t5

    gin.add_config_file_search_path(os.path.join(REPO, "configs"))
    gin.parse_config_file(os.path.join(REPO, "configs", "models", f"{args.shape}.gin"))
    model = t5.build_model()
    config = model.config
    pairs = demo_corpus.generate_pairs({"train": 3000, "validation": 0, "test": 0}, seed=0)["train"]
    if partitioning.is_chief():
        vocab_lib.train_vocabulary([s for p in pairs for s in p], args.workdir,
                                   vocab_size=min(1000, config.vocab_size))
    partitioning.sync_processes("benchmark: vocabulary")
    vocab = vocab_lib.load_vocabulary(os.path.join(args.workdir, "sentencepiece.model"))
    part = partitioning.Partitioner.create()
    params, _ = part.init(lambda key: t5.init_params(model, key), jax.random.key(0))
    policy = policy_lib.Policy(model, part.gather(params), vocab)
    sources, references = [p[0] for p in pairs[:args.sources]], [p[1] for p in pairs[:args.sources]]
    original = decoding.sample  # exactly `length` tokens per sample: a worst-case Grow step
    decoding.sample = lambda *a, **k: original(*a, **dict(k, ignore_eos=True))
    per_shard = max(1, args.sources // (4 * jax.process_count()))  # several shards per process
    kwargs = dict(num_samples=args.samples, batch_size=min(32, per_shard), max_decode_length=args.length,
                  sources_per_shard=per_shard)
    grow.grow_dataset(policy, sources[:per_shard * jax.process_count()], references[:per_shard * jax.process_count()],
                      os.path.join(args.workdir, "warm"), 1, **kwargs)  # compilation
    partitioning.sync_processes("benchmark: grow start")
    t0 = time.perf_counter()
    grow.grow_dataset(policy, sources, references, os.path.join(args.workdir, "store"), 1, **kwargs)
    grow_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, size=(args.batch, 2, args.length)).astype(np.int32)
    tokens[:, :, -1] = 1
    enc, targets = tokens[:, 0], tokens[:, 1]
    batch = {"encoder_input_tokens": enc, "decoder_target_tokens": targets,
             "decoder_input_tokens": np.concatenate([np.zeros((args.batch, 1), np.int32), targets[:, :-1]], 1),
             "decoder_loss_weights": np.ones(targets.shape, np.float32)}
    index, shards = part.data_shard_info()
    rows = slice(index * args.batch // shards, (index + 1) * args.batch // shards)
    device_batch = part.shard_batch({k: v[rows] for k, v in batch.items()})
    opt = optim.create_optimizer(lambda learning_rate: optim.adamw(learning_rate),
                                 schedule=optim.learning_rate_schedule("constant", 1e-4, 0))
    state, shardings = trainer.init_train_state(model, opt, jax.random.key(0), part.mesh, part.rules)
    step = trainer.make_train_step(opt, losses.make_loss_fn(model), mesh=part.mesh, rules=part.rules,
                                 state_shardings=shardings)
    for _ in range(2):
        state, metrics = step(state, device_batch)
        float(metrics["loss"])
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, device_batch)
        float(metrics["loss"])
        times.append(time.perf_counter() - t0)
    if partitioning.is_chief():
        step_s = float(np.median(times))
        print(RESULT + json.dumps({
            "processes": jax.process_count(), "devices": jax.device_count(),
            "grow_samples_per_s": args.sources * args.samples / grow_s,
            "improve_tokens_per_s": args.batch * args.length / step_s, "improve_step_s": step_s}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="rest_iwslt")
    parser.add_argument("--layouts", default="1x8,2x4,4x2")
    parser.add_argument("--sources", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    sys.path.insert(0, REPO)
    from rest_jax import launch

    rows = []
    for layout in args.layouts.split(","):
        processes, devices = (int(x) for x in layout.split("x"))
        out = io.StringIO()
        with tempfile.TemporaryDirectory() as workdir:
            flags = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "workdir", "layouts")]
            code = launch.run([*flags, "--child", f"--workdir={workdir}"], processes, devices, out=out,
                              program=[sys.executable, os.path.abspath(__file__)])
        lines = [line.split(RESULT, 1)[1] for line in out.getvalue().splitlines() if RESULT in line]
        if code != 0 or not lines:
            sys.exit(f"layout {layout} failed (status {code}):\n{out.getvalue()[-3000:]}")
        rows.append(json.loads(lines[0]))
    print(f"command: python benchmarks/multiprocess_benchmark.py {' '.join(sys.argv[1:])}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}; shape {args.shape}; Grow {args.sources} sources x N={args.samples} x "
          f"{args.length} tokens; Improve step {args.batch} x {args.length} x {args.length}, AdamW")
    print("| processes x devices | Grow samples/s | Improve tokens/s | Improve step s |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['processes']} x {r['devices'] // r['processes']} | {r['grow_samples_per_s']:.1f} | "
              f"{r['improve_tokens_per_s']:.0f} | {r['improve_step_s']:.3f} |")


if __name__ == "__main__":
    main()
