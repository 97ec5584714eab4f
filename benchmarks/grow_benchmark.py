"""Grow end to end (sampling + scoring + writing) on the paper's IWSLT shape: sources/s, samples/s, split.

ReST's Grow (Gulcehre et al. 2023, Sec. 3) must be dominated by sampling: writing the store and scoring with
sentence chrF should stay under a fifth of the time. Random-init weights (the cost does not depend on them),
a SentencePiece vocabulary trained on the demo corpus, forced full-length samples (no early EOS).

  python benchmarks/grow_benchmark.py [--shape rest_iwslt|tiny] [--sources 64] [--samples 8] [--length 32]
"""

import argparse
import os
import platform
import sys
import tempfile
import time

import gin
import jax


def random_policy(shape: str, bindings: tuple[str, ...] = ()):
    """(policy of `configs/models/<shape>.gin` with random weights and a vocabulary trained on the demo corpus,
    3,000 demo (source, reference) pairs, a temporary directory): the set-up of the Grow and online benchmarks."""
    import flax.linen as nn

    from rest_jax import policy as policy_lib
    from rest_jax.data import demo_corpus, vocab as vocab_lib
    from rest_jax.model import t5

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
    gin.add_config_file_search_path(root)
    gin.parse_config_files_and_bindings([os.path.join(root, "models", f"{shape}.gin")], list(bindings))
    tmp = tempfile.mkdtemp()
    pairs = demo_corpus.generate_pairs({"train": 3000, "validation": 0, "test": 0}, seed=0)["train"]
    model = t5.build_model()
    vocab_path = vocab_lib.train_vocabulary([s for p in pairs for s in p], tmp,
                                            vocab_size=min(1000, model.config.vocab_size))
    params = jax.device_get(nn.unbox(t5.init_params(model, jax.random.PRNGKey(0))))
    return policy_lib.Policy(model, params, vocab_lib.load_vocabulary(vocab_path)), pairs, tmp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="rest_iwslt")
    parser.add_argument("--sources", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()

    from rest_jax import decoding, grow

    policy, pairs, tmp = random_policy(args.shape)
    sources = [p[0] for p in pairs[:args.sources]]
    references = [p[1] for p in pairs[:args.sources]]

    # Force exactly `length` tokens per sample: the cost of a worst-case Grow step.
    original = decoding.sample
    decoding.sample = lambda *a, **k: original(*a, **dict(k, ignore_eos=True))
    # Warm-up (compilation) on a separate store.
    grow.grow_dataset(policy, sources[:args.batch_size], references[:args.batch_size], os.path.join(tmp, "warm"), 1,
                      num_samples=args.samples, batch_size=args.batch_size, max_decode_length=args.length,
                      sources_per_shard=args.batch_size)
    t0 = time.perf_counter()
    meta = grow.grow_dataset(policy, sources, references, os.path.join(tmp, "store"), 1, num_samples=args.samples,
                             batch_size=args.batch_size, max_decode_length=args.length,
                             sources_per_shard=args.batch_size)
    wall = time.perf_counter() - t0
    timing = meta["timing"]
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}; jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"shape {args.shape}: {args.sources} sources x N={args.samples}, {args.length} tokens per sample")
    print("| sources/s | samples/s | sampling s | scoring s | writing s | scoring+writing share |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    share = (timing["score"] + timing["write"]) / max(wall, 1e-9)
    print(f"| {args.sources / wall:.1f} | {args.sources * args.samples / wall:.1f} | {timing['sample']:.2f} | "
          f"{timing['score']:.2f} | {timing['write']:.2f} | {100 * share:.1f}% |")


if __name__ == "__main__":
    main()
