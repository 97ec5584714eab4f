"""Grow (ReST Sec. 3, Alg. 1): sample N translations per source from the policy, score every pair, store.

The Grow dataset D_g = {samples} ∪ D is written as a Grow store (`rest_jax.data.grow_store`): sharded
TFRecords plus metadata, reused by every Improve step of this Grow and by later experiments. Work is split
into shards of sources; a shard's samples depend only on (seed, grow index, shard), so a killed Grow rerun
with the same command keeps the finished shards and redoes the rest with identical results.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping, Sequence

import gin
import jax
import numpy as np

from rest_jax import gin_utils
from rest_jax import metrics as metrics_lib
from rest_jax import partitioning
from rest_jax import policy as policy_lib
from rest_jax import rewards as rewards_lib
from rest_jax.data import grow_store as store_lib
from rest_jax.data import tasks
from rest_jax.io import console


@gin.configurable(denylist=["policy", "sources", "references", "store_dir", "grow_index"])
def grow_dataset(policy: policy_lib.Policy, sources: Sequence[str], references: Sequence[str], store_dir: str,
                 grow_index: int, *, reward: Any = None, reward_name: str = "chrf", num_samples: int = 8,
                 temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, batch_size: int = 64,
                 max_input_length: int = 128, max_decode_length: int = 128, sources_per_shard: int = 1024,
                 include_references: bool = True, seed: int = 0, host_id: int | None = None,
                 num_hosts: int | None = None, checkpoint: str = "", vocab_path: str | None = None,
                 config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Writes the Grow dataset of `policy` on `sources` to `store_dir` (resumable) and returns its metadata.

    Args:
      policy: The current policy π_θ (model, params, vocabulary).
      sources, references: The source sentences x of D and their references y (source id = position).
      store_dir: Grow store directory; finished shards there are kept.
      grow_index: g, recorded in every record.
      reward, reward_name: The reward model R(x, y) in [0, 1] (an object, or a registered name).
      num_samples: N samples per source (100 for IWSLT and 25 for WMT in the paper).
      temperature, top_k, top_p: Sampling; the paper uses temperature 0.8 and no top-k/top-p.
      batch_size: Sources per sampling batch (each yields N rows).
      max_input_length, max_decode_length: Token limits of sources and samples.
      sources_per_shard: Sources per store shard (the unit of resumption).
      include_references: Add the references to D_g (the paper does; ReST-EM does not).
      seed: Sampling seed; with the grow index and shard it fixes every sample.
      host_id, num_hosts: This host's share of shards (default: jax process index/count).
      checkpoint, vocab_path, config: Recorded in the metadata.

    Returns:
      The store's metadata plus `timing` (seconds spent sampling, scoring and writing).
    """
    reward = reward if reward is not None else rewards_lib.get(reward_name)
    host_id = jax.process_index() if host_id is None else host_id
    num_hosts = jax.process_count() if num_hosts is None else num_hosts
    if len(sources) != len(references):
        raise ValueError(f"Grow: {len(sources)} sources but {len(references)} references.")
    writer = store_lib.GrowStoreWriter(store_dir, grow_index, len(sources), num_samples,
                                       sources_per_shard=sources_per_shard, include_references=include_references)
    pending = writer.pending_shards(host_id, num_hosts)
    timing = {"sample": 0.0, "score": 0.0, "write": 0.0}
    sample_rewards: list[np.ndarray] = []
    distinct = {1: [], 2: []}
    length_ratios: list[float] = []
    sampled_tokens, sampled_flops = 0, 0.0
    total_sources = sum(len(writer.shard_source_ids(s)) for s in pending)
    # A resumed Grow says what it kept (shown by default, like a resumed training); a fresh one is detail.
    resumed = len(pending) < len(range(host_id, writer.num_shards, num_hosts))
    log = console.logger.info if resumed else logging.info
    log("Grow %d: %d of %d shards to write (%d sources x %d samples) in %s.", grow_index, len(pending),
        writer.num_shards, total_sources, num_samples, store_dir)
    bar = metrics_lib.progress(total_sources * num_samples, desc=f"grow {grow_index}", unit="samples")
    start_time = time.perf_counter()
    for shard in pending:
        ids = list(writer.shard_source_ids(shard))
        src = [sources[i] for i in ids]
        ref = [references[i] for i in ids]
        src_tok, _ = policy_lib.tokenize(policy.vocab, src, max_input_length)

        t0 = time.perf_counter()
        shard_seed = int(np.random.SeedSequence([seed, grow_index, shard]).generate_state(1)[0] % (2**31))
        gens = policy.generate(src, method="sample", num_samples=num_samples, batch_size=batch_size,
                               max_input_length=max_input_length, max_decode_length=max_decode_length,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=shard_seed,
                               source_tokens=src_tok)
        ref_tok = ref_lp = None
        if include_references:
            ref_tok, _ = policy_lib.tokenize(policy.vocab, ref, max_decode_length)
            ref_lp = policy.score(src_tok, ref_tok, batch_size)
        t1 = time.perf_counter()

        cand = [c for cands in gens.texts for c in cands]
        flat_src = [s for s in src for _ in range(num_samples)]
        flat_ref = [r for r in ref for _ in range(num_samples)]
        if include_references:
            cand += ref
            flat_src += src
            flat_ref += ref
        scores = rewards_lib.score_pairs(reward, flat_src, cand, flat_ref if reward.needs_reference else None)
        t2 = time.perf_counter()
        sample_rewards.append(scores[:len(ids) * num_samples])
        for i, cands in enumerate(gens.texts):
            for n_gram in distinct:
                distinct[n_gram].append(metrics_lib.distinct_n(cands, n_gram))
            ref_len = max(len(ref[i].split()), 1)
            length_ratios.extend(len(c.split()) / ref_len for c in cands)
        lengths = [len(t) for toks in gens.tokens for t in toks]
        sampled_tokens += sum(lengths)
        sampled_flops += metrics_lib.estimate_decode_flops(policy.config, len(ids), num_samples,
                                                           float(np.mean([len(t) for t in src_tok])),
                                                           float(np.mean(lengths)))

        columns: dict[str, list[Any]] = {k: [] for k in (
            "source_id", "sample_id", "is_reference", "grow_index", "reward", "source_text", "candidate_text",
            "reference_text", "source_tokens", "candidate_tokens", "behaviour_logprobs",
            "behaviour_logprob_sum")}

        def add(i: int, sample_id: int, text: str, tokens: np.ndarray, logp: np.ndarray, score: float) -> None:
            columns["source_id"].append(ids[i])
            columns["sample_id"].append(sample_id)
            columns["is_reference"].append(int(sample_id == store_lib.REFERENCE_SAMPLE_ID))
            columns["grow_index"].append(grow_index)
            columns["reward"].append(float(score))
            columns["source_text"].append(src[i])
            columns["candidate_text"].append(text)
            columns["reference_text"].append(ref[i])
            columns["source_tokens"].append(src_tok[i])
            columns["candidate_tokens"].append(np.asarray(tokens, np.int64))
            columns["behaviour_logprobs"].append(np.asarray(logp, np.float32))
            columns["behaviour_logprob_sum"].append(float(np.sum(logp, dtype=np.float32)))

        k = 0
        for i in range(len(ids)):
            for j in range(num_samples):
                add(i, j, gens.texts[i][j], gens.tokens[i][j], gens.token_log_probs[i][j], scores[k])
                k += 1
        if include_references:
            for i in range(len(ids)):
                add(i, store_lib.REFERENCE_SAMPLE_ID, ref[i], ref_tok[i], ref_lp[i], scores[k])
                k += 1
        writer.write_shard(shard, [columns])
        t3 = time.perf_counter()
        timing["sample"] += t1 - t0
        timing["score"] += t2 - t1
        timing["write"] += t3 - t2
        bar.update(len(ids) * num_samples)
    bar.close()
    elapsed = time.perf_counter() - start_time
    # Every process has written its shards before process 0 checks them all and writes the metadata, which
    # the others then read: the store is complete for every process when grow_dataset returns.
    partitioning.sync_processes(f"rest_jax: grow {grow_index} shards written")
    if host_id == 0:
        meta = writer.write_metadata(
            config=dict(config or {}, num_samples=num_samples, temperature=temperature, top_k=top_k, top_p=top_p,
                        reward=reward.name, seed=seed),
            # The policy's vocabulary, not the path: its fingerprint covers encoding options a path does not
            # carry (`HuggingFaceVocabulary.add_prefix_space`).
            checkpoint=checkpoint, vocab=policy.vocab if vocab_path is not None else None,
            model_config=policy.config,
            wait_s=0.0 if num_hosts == 1 or jax.process_count() > 1 else 3600.0)
    partitioning.sync_processes(f"rest_jax: grow {grow_index} metadata written")
    if host_id != 0:
        meta = store_lib.GrowStore(store_dir).metadata if jax.process_count() > 1 else {}
    meta = dict(meta)
    # Sums and counts of every process's diversity statistics (called by all: a collective), so that process
    # 0's TensorBoard scalars describe the whole Grow, not only its own shards.
    sums = partitioning.allgather_objects({k: (float(np.sum(v)), len(v)) for k, v in
                                           (("distinct_1", distinct[1]), ("distinct_2", distinct[2]),
                                            ("length_ratio", length_ratios))})
    diversity = {k: sum(p[k][0] for p in sums) / max(sum(p[k][1] for p in sums), 1) for k in sums[0]}
    if sample_rewards:
        rewards_all = np.concatenate(sample_rewards)
        if jax.process_count() > 1 and host_id == 0:
            # TensorBoard (written by process 0) shows every process's samples, not only process 0's.
            cols = store_lib.GrowStore(store_dir).as_numpy(["reward", "is_reference"])
            rewards_all = cols["reward"][cols["is_reference"] == 0]
        scalars = metrics_lib.quantile_metrics(rewards_all, "reward")
        scalars.update({**diversity, "samples_per_sec": total_sources * num_samples / elapsed,
                        "tokens_per_sec": sampled_tokens / elapsed})
        with metrics_lib.MetricWriter(os.path.dirname(store_dir.rstrip("/")), "grow") as writer:
            writer.write_scalars(grow_index, scalars)
            writer.write_histograms(grow_index, {"reward": rewards_all})
    meta["timing"] = dict(timing, total=elapsed, sources=total_sources,
                          sources_per_s=total_sources / elapsed if elapsed > 0 else None,
                          samples_per_s=total_sources * num_samples / elapsed if elapsed > 0 else None)
    if total_sources:
        # The store's statistics cover every shard, also those a resumed Grow found already written.
        mean = meta.get("reward_stats", {}).get("samples", {}).get("mean", float(np.mean(rewards_all)))
        seconds = max(timing["sample"], 1e-9)  # this process's sampling, on its own devices
        speed = metrics_lib.throughput(sampled_tokens / seconds, sampled_flops / seconds, policy.config.dtype,
                                       jax.local_device_count())
        console.stage_done(
            f"Grow {grow_index}", elapsed,
            f"{total_sources * num_samples} samples of {total_sources} sources, mean reward {mean:.4f}, "
            f"{meta['timing']['samples_per_s']:.1f} samples/s (sampling {timing['sample']:.1f}s at {speed}, "
            f"scoring {timing['score']:.1f}s, writing {timing['write']:.1f}s); store {store_dir}")
    return meta


@gin.configurable
@gin_utils.sets_knobs({"grow_dataset.checkpoint": "set grow.checkpoint instead",
                       "grow_dataset.vocab_path": "set grow.vocabulary instead"})
def grow(model_dir: str = gin.REQUIRED, task: str = gin.REQUIRED, checkpoint: str = gin.REQUIRED,
         vocabulary: str = gin.REQUIRED, split: str = "train", grow_index: int = 1,
         max_sources: int | None = None) -> dict[str, Any]:
    """The `rest_jax grow` subcommand: one Grow step from a checkpoint.

    Writes the store to `<model_dir>/grow_<grow_index>/store`; sampling and the reward are `grow_dataset`'s
    knobs.

    Args:
      model_dir: The run directory the store goes under.
      task, split, max_sources: The sources x: a task's split, its first `max_sources` (None: all).
      checkpoint, vocabulary: The policy that samples (its latest step).
      grow_index: g, the Grow step's number (the store's folder and its records).
    """
    policy = policy_lib.load_policy(checkpoint, vocabulary)
    sources, references = tasks.read_split(task, split, max_sources)
    store_dir = os.path.join(model_dir, f"grow_{grow_index}", "store")
    return grow_dataset(policy, sources, references, store_dir, grow_index, checkpoint=checkpoint,
                        vocab_path=vocabulary)
