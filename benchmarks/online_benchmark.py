"""Online RL iterations on the paper's IWSLT shape: samples/s and updates/s, split by part (issue 15).

The cost comparison of ReST with online RL (Gulcehre et al. 2023, Sec. 5) rests on measured throughput: an
online iteration samples and scores like Grow, then takes updates like Improve, plus one teacher-forced pass
for the behaviour and BC log-probs (and PPO's values). `online.run_iterations` from a random-init policy of the
given shape (samples run to the full length: random weights rarely emit EOS, the worst case), 1 + K
iterations: the mean of the K after the first (which compiles), as the run reports it (`cost.steady_iteration`).

  python benchmarks/online_benchmark.py [--shape rest_iwslt|tiny] [--algorithms grpo,ppo] [--sources 32]
      [--samples 8] [--length 32] [--minibatch 64] [--iterations 3]
"""

import argparse
import os
import platform
import sys
import time

import jax


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="rest_iwslt")
    parser.add_argument("--algorithms", default="grpo,ppo")
    parser.add_argument("--sources", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--minibatch", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()

    from grow_benchmark import random_policy  # this directory: `python benchmarks/online_benchmark.py`

    from rest_jax import online, partitioning
    from rest_jax import rewards

    policy, pairs, tmp = random_policy(args.shape, (
        "online/create_optimizer.optimizer = 'adamw'", "online/learning_rate_schedule.name = 'constant'",
        "online/learning_rate_schedule.base_learning_rate = 1e-4"))
    sources, references = [p[0] for p in pairs], [p[1] for p in pairs]
    validation = (sources[:8], references[:8])
    mesh = partitioning.create_mesh()
    part = partitioning.Partitioner.create(mesh, partitioning.standard_logical_axis_rules())
    rows = args.sources * args.samples

    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}; jax {jax.__version__} on {jax.devices()[0].platform} x {jax.device_count()}")
    print(f"shape {args.shape}: {args.sources} sources x N={args.samples} per iteration, {args.length} tokens "
          f"per sample, updates of {args.minibatch} rows (one pass), seconds per iteration after compilation")
    print("| algorithm | s/iteration | samples/s | sampling s | scoring (host) s | advantages s | updates s | updates/s | "
          "update tokens/s | compile+first s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for algorithm in args.algorithms.split(","):
        t0 = time.perf_counter()
        result = online.run_iterations(
            policy, sources, references, validation, rewards.get("chrf"), os.path.join(tmp, algorithm),
            algorithm=algorithm, num_iterations=1 + args.iterations, sources_per_iteration=args.sources,
            num_samples=args.samples, temperature=1.0, truncated_reward=None, epochs_per_iteration=1,
            minibatch_size=args.minibatch, kl_coef=0.05, kl_target=None, kl_horizon=10000, discount=1.0,
            gae_lambda=0.95, eval_period=0, checkpoint_period=10**6,
            lengths={"inputs": args.length, "targets": args.length}, seed=0, part=part,
            shard=partitioning.data_shard_info(mesh, part.rules))
        steady = result["cost"]["steady_iteration"]
        per, updates = steady["seconds"], steady["updates"]
        total = sum(per.values())
        first_wall = time.perf_counter() - t0 - args.iterations * total - result["cost"]["timing"]["validation"]
        tokens = updates * args.minibatch * args.length  # full-length samples: every row has `length` tokens
        print(f"| {algorithm} | {total:.2f} | {rows / total:.1f} | {per['sample']:.2f} | {per['score']:.3f} | "
              f"{per['advantages']:.2f} | {per['updates']:.2f} | {updates / per['updates']:.2f} | "
              f"{tokens / per['updates']:.0f} | {first_wall:.1f} |")


if __name__ == "__main__":
    main()
