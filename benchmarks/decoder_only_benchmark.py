"""Decoder-only LM: train step and sampling throughput, rest_jax vs Hugging Face transformers Llama (issue 17).

The same ~70M Llama-style network on both sides (`configs/models/decoder_only/small_70m.gin`: 12 layers,
d 512, grouped-query attention 8/4 heads, SwiGLU, vocab 32k, untied; HF `LlamaForCausalLM` with the same
config, random weights, float32, eager attention):

* **train**: one step of causal-LM cross entropy on B x T tokens (all weighted), AdamW (lr 1e-4, weight decay
  0.01, eps 1e-8), forward + backward + update, the loss fetched to the host every step;
* **sample**: N completions of each of B prompts of P tokens, exactly L new tokens each (no early stop), at
  temperature 1 with a KV cache: `decoding.sample_lm` (prompts prefilled in one pass, one jitted while-loop)
  against HF `generate(do_sample=True, num_return_sequences=N, min_new_tokens=L, max_new_tokens=L)`.

    python benchmarks/decoder_only_benchmark.py                 # ~10 min on 2 cores
    python benchmarks/decoder_only_benchmark.py --steps 2 --batch 4 --length 64 --prompts 2

Each measurement runs in its own subprocess (peak RSS is its framework's alone); the best of `--repeats`
alternating runs is shown. Train GFLOP/s counts 6 x (matmul parameters) + 6 x layers x T x heads x head_dim per
token (forward + backward of the projections and of causal attention), over the float32 matmul peak measured in
the same run (`train_benchmark.worker_peak`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train_benchmark as tb  # noqa: E402  pylint: disable=wrong-import-position  (this script's folder)

LR, WEIGHT_DECAY, EPS = tb.LR, tb.WEIGHT_DECAY, tb.EPS  # the train step's AdamW (tb.adamw_step)
SHAPE = "models/decoder_only/small_70m.gin"


def _config():
    from rest_jax import gin_utils  # pylint: disable=import-outside-toplevel
    from rest_jax.model import decoder_only  # pylint: disable=import-outside-toplevel

    gin_utils.parse([SHAPE], [])
    return decoder_only.DecoderOnlyConfig()


def _hf_config(config):
    import transformers  # pylint: disable=import-outside-toplevel

    assert config.mlp_activations == ("silu", "linear") and not config.logits_via_embedding
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.emb_dim, intermediate_size=config.mlp_dim,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        num_hidden_layers=config.num_layers, rms_norm_eps=config.layer_norm_epsilon, rope_theta=config.rope_theta,
        tie_word_embeddings=False, max_position_embeddings=4096, attn_implementation="eager", pad_token_id=0,
        bos_token_id=2, eos_token_id=1)


def _tokens(vocab, rows, length, seed=0):
    import numpy as np  # pylint: disable=import-outside-toplevel

    return np.random.default_rng(seed).integers(2, vocab, size=(rows, length)).astype(np.int32)


def _train_flops_per_token(config, length):
    matmul = (config.emb_dim * (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
              + config.num_heads * config.head_dim * config.emb_dim + 3 * config.emb_dim * config.mlp_dim)
    matmul = matmul * config.num_layers + config.emb_dim * config.vocab_size
    return 6 * matmul + 6 * config.num_layers * length * config.num_heads * config.head_dim


def _causal_lm_loss_fn(model):
    """Cross entropy of every next token of `decoder_input_tokens` (a plain LM batch, as HF's causal-LM loss)."""
    from rest_jax import losses  # pylint: disable=import-outside-toplevel

    def loss_fn(params, batch, rng):
        del rng  # no dropout in this network
        logits = model.apply({"params": params}, batch["decoder_input_tokens"], batch["decoder_target_tokens"] > 0)
        total, _, num = losses.cross_entropy_loss(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])
        return total / num, {"num_tokens": num}

    return loss_fn


def worker_jax_train(batch, length, warmup, steps):
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from rest_jax.model import decoder_only  # pylint: disable=import-outside-toplevel

    config = _config()
    seq = _tokens(config.vocab_size, batch, length)
    tb._reset_peak_rss()  # pylint: disable=protected-access
    base = tb._rss_mb("VmRSS")  # pylint: disable=protected-access
    host = {"decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), seq[:, :-1]], axis=1),
            "decoder_target_tokens": seq, "decoder_loss_weights": np.ones(seq.shape, np.float32)}
    model = decoder_only.DecoderOnly(config)
    state, step, device_batch = tb.adamw_step(model, host, _causal_lm_loss_fn(model))
    t0 = time.perf_counter()
    for _ in range(warmup):
        state, m = step(state, device_batch)
        jax.device_get(m["loss"])
    warm = time.perf_counter() - t0
    losses, times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, device_batch)
        losses.append(float(jax.device_get(m["loss"])))
        times.append(time.perf_counter() - t0)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return _result("rest_jax", times, batch * length, base, losses, warm, params)


def worker_torch_train(batch, length, warmup, steps):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    torch.manual_seed(0)
    config = _config()
    seq = torch.from_numpy(_tokens(config.vocab_size, batch, length)).long()
    tb._reset_peak_rss()  # pylint: disable=protected-access
    base = tb._rss_mb("VmRSS")  # pylint: disable=protected-access
    model = transformers.LlamaForCausalLM(_hf_config(config)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS)

    def one_step():
        out = model(input_ids=seq, labels=seq)  # HF shifts the labels itself
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.item())

    warm, losses, times, _ = tb.time_calls(one_step, warmup, steps)
    params = sum(p.numel() for p in model.parameters())
    return _result(f"HF transformers {transformers.__version__} (PyTorch {torch.__version__} eager)", times,
                   batch * length, base, losses, warm, params)


def worker_jax_sample(prompts, prompt_length, num_samples, new_tokens, repeats):
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from rest_jax import decoding  # pylint: disable=import-outside-toplevel
    from rest_jax.model import decoder_only  # pylint: disable=import-outside-toplevel

    config = _config()
    tokens = _tokens(config.vocab_size, prompts, prompt_length, seed=1)
    mask = np.ones(tokens.shape, bool)
    tb._reset_peak_rss()  # pylint: disable=protected-access
    base = tb._rss_mb("VmRSS")  # pylint: disable=protected-access
    model = decoder_only.DecoderOnly(config)
    params = jax.jit(lambda k: decoder_only.init_params(model, k))(jax.random.key(0))

    def run(seed):  # an impossible stop id: exactly `new_tokens` per row, as HF's min_new_tokens forces
        out = decoding.sample_lm(params, model, tokens, mask, jax.random.key(seed), num_samples=num_samples,
                                 max_decode_len=new_tokens, temperature=1.0, stop_ids=(config.vocab_size,))
        return int(np.asarray(out.lengths).sum())

    t0 = time.perf_counter()
    run(0)
    warm = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        emitted = run(r + 1)
        times.append(time.perf_counter() - t0)
    return _result("rest_jax", times, emitted, base, [0.0], warm, None)


def worker_torch_sample(prompts, prompt_length, num_samples, new_tokens, repeats):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    torch.manual_seed(0)
    config = _config()
    tokens = torch.from_numpy(_tokens(config.vocab_size, prompts, prompt_length, seed=1)).long()
    tb._reset_peak_rss()  # pylint: disable=protected-access
    base = tb._rss_mb("VmRSS")  # pylint: disable=protected-access
    model = transformers.LlamaForCausalLM(_hf_config(config)).eval()

    def run():
        with torch.no_grad():
            out = model.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, num_return_sequences=num_samples, min_new_tokens=new_tokens,
                                 max_new_tokens=new_tokens, pad_token_id=0)
        return int((out.shape[1] - prompt_length) * out.shape[0])

    t0 = time.perf_counter()
    run()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        emitted = run()
        times.append(time.perf_counter() - t0)
    return _result(f"HF transformers {transformers.__version__} generate", times, emitted, base, [0.0], warm, None)


def _result(name, times, tokens, base_mb, losses, warm, params):
    import numpy as np  # pylint: disable=import-outside-toplevel

    seconds = float(np.median(times))
    return {"framework": name, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_rss_mb": tb._rss_mb("VmHWM"), "work_mb": tb._rss_mb("VmHWM") - base_mb,  # pylint: disable=protected-access
            "warmup_s": warm, "first_loss": losses[0], "last_loss": losses[-1], "params": params}


WORKERS = {"jax_train": worker_jax_train, "torch_train": worker_torch_train, "jax_sample": worker_jax_sample,
           "torch_sample": worker_torch_sample}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="train rows")
    parser.add_argument("--length", type=int, default=256, help="train tokens per row")
    parser.add_argument("--steps", type=int, default=4, help="timed train steps")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per framework; best is shown")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        kind, *numbers = args.worker
        print("RESULT " + json.dumps(WORKERS[kind](*map(int, numbers))), flush=True)
        return

    command = "python " + " ".join([os.path.relpath(__file__, tb.REPO)] + sys.argv[1:])
    print(f"command: {command}\nmachine: {tb._machine()}\nload average before: "  # pylint: disable=protected-access
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    peak = tb._run_worker(["peak"])["peak_gflops"]  # pylint: disable=protected-access
    specs = {"train": [str(args.batch), str(args.length), "2", str(args.steps)],
             "sample": [str(args.prompts), str(args.prompt_length), str(args.samples), str(args.new_tokens), "2"]}
    best = {}
    for part, spec in specs.items():
        runs = {"jax": [], "torch": []}
        for _ in range(args.repeats):
            for kind in runs:
                runs[kind].append(tb._run_worker([f"{kind}_{part}", *spec], script=__file__))  # pylint: disable=protected-access
        best[part] = {kind: max(rs, key=lambda r: r["tokens_per_s"]) for kind, rs in runs.items()}
        print(f"  {part}: done", flush=True)
    config = _config()
    flops = _train_flops_per_token(config, args.length)
    train = best["train"]
    print(f"\nshape {SHAPE}: {train['jax']['params'] / 1e6:.1f}M parameters (HF {train['torch']['params'] / 1e6:.1f}M); "
          f"float32 matmul peak {peak:.0f} GFLOP/s\n"
          f"| part | framework | tokens/s | s (median) | GFLOP/s | of peak | peak RSS MB | vs HF |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    for part, rows in best.items():
        for kind in ("jax", "torch"):
            r = rows[kind]
            gflops = r["tokens_per_s"] * flops / 1e9 if part == "train" else None
            share = f"{100 * gflops / peak:.1f}%" if gflops else "-"
            print(f"| {part} | {r['framework']} | {r['tokens_per_s']:.0f} | {r['seconds']:.2f} | "
                  f"{f'{gflops:.1f}' if gflops else '-'} | {share} | {r['peak_rss_mb']:.0f} | "
                  f"{r['tokens_per_s'] / rows['torch']['tokens_per_s']:.2f}x |")
    print(f"\ntrain: batch {args.batch} x {args.length} tokens, AdamW; losses rest_jax "
          f"{train['jax']['first_loss']:.3f} -> {train['jax']['last_loss']:.3f}, HF {train['torch']['first_loss']:.3f} "
          f"-> {train['torch']['last_loss']:.3f}\nsample: {args.prompts} prompts x {args.prompt_length} tokens, "
          f"{args.samples} completions of {args.new_tokens} tokens each, temperature 1, KV cache; warm-up "
          f"rest_jax {best['sample']['jax']['warmup_s']:.1f} s (compilation), HF {best['sample']['torch']['warmup_s']:.1f} s"
          f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "peak_gflops": peak, "best": best}, f, indent=2)


if __name__ == "__main__":
    main()
