"""Training the `learned` reward model (`rest_jax reward-model`), with the shared trainer.

ReST (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 4) scores Grow samples with a learned, reference-free metric
(Metric X). Where no such model exists for a language pair, train one: a T5 encoder (masked mean pooling) or
encoder-decoder (first decoder step) with a sigmoid regression head (`rest_jax.model.heads.RegressionModel`),
fitted by MSE to scores in [0, 1] on (source, candidate, [reference], score) examples, with
`rest_jax.trainer.train_loop` (the loop of BC and Improve). The typical use distils a reference-based metric
(sentence chrF of Grow samples against their references) into a reference-free (QE) model, so that best-of-N
reranking and Grow scoring work on sources without references. The reward that scores with the trained model,
the input format and the directory layout are in `rest_jax.rewards.learned`.

Training data (`train_learned_reward`, the gin entry):
  * a Grow store (`rest_jax.data.grow_store`): every stored pair with its stored reward, or re-scored with
    another reward (`rescore_with='chrf'`), references included or not;
  * parallel text of a task plus a reference-based teacher reward: candidates are synthetic corruptions of the
    reference (*choice*, documented in `corrupt`), each scored by the teacher against the reference.
Examples are split into train / held-out by source text, so held-out sources are unseen. Held-out MSE, Pearson
and Spearman are logged every `eval_period` steps and stored in `reward_model.json`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
from etils import epath

from rest_jax import checkpoints as ckpt_lib
from rest_jax import decoding
from rest_jax import optim, partitioning
from rest_jax import trainer
# Imported here, not on first use: gin locks its registry when the command line starts the entry point.
from rest_jax.data import grow_store as store_lib
from rest_jax.data import tasks
from rest_jax.io import atomic
from rest_jax.model import heads
from rest_jax.model.t5 import T5Config
from rest_jax.rewards import base as rewards_base
from rest_jax.rewards import learned
from rest_jax.rewards.learned import CHECKPOINT_DIR, CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, VOCAB_FILE
from rest_jax.rewards.learned import encode_inputs, format_input

PyTree = Any


# -------------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class RewardExamples:
    """Training examples of a reward model: texts [M] and target scores float32 [M] in [0, 1]."""

    sources: list[str]
    candidates: list[str]
    references: list[str] | None
    scores: np.ndarray
    origin: str = "examples"

    def __post_init__(self):
        self.sources, self.candidates = list(self.sources), list(self.candidates)
        self.references = None if self.references is None else list(self.references)
        self.scores = np.asarray(self.scores, np.float32).reshape(-1)
        n = len(self.candidates)
        if len(self.sources) != n or len(self.scores) != n or (self.references is not None
                                                               and len(self.references) != n):
            raise ValueError(f"{self.origin}: {len(self.sources)} sources, {n} candidates, "
                             f"{None if self.references is None else len(self.references)} references and "
                             f"{len(self.scores)} scores; they must be equally many.")
        bad = ~np.isfinite(self.scores) | (self.scores < 0) | (self.scores > 1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{self.origin}: score {self.scores[i]!r} of example {i} (source="
                             f"{self.sources[i][:80]!r}, candidate={self.candidates[i][:80]!r}) is not a finite "
                             f"value in [0, 1] ({int(bad.sum())} such scores); rewards must be normalised.")

    def __len__(self) -> int:
        return len(self.candidates)

    def subset(self, index: Sequence[int] | np.ndarray) -> "RewardExamples":
        index = np.asarray(index, np.int64)
        return RewardExamples([self.sources[i] for i in index], [self.candidates[i] for i in index],
                              None if self.references is None else [self.references[i] for i in index],
                              self.scores[index], self.origin)


def examples_from_grow_store(store_dir: str | Sequence[str], include_references: bool = True,
                             rescore_with: str | None = None,
                             rescore_batch_size: int = 65536, max_examples: int | None = None,
                             seed: int = 0) -> RewardExamples:
    """Every (source, candidate, reference, reward) of a Grow store (ReST Sec. 3: Grow data is reusable).

    Args:
      store_dir: A complete Grow store, or several (their rows pooled, e.g. every Grow step so far).
      include_references: Keep the reference records (candidate = reference; they anchor the top of the
        scale).
      rescore_with: Name of a registered reward to re-score the pairs with (e.g. 'chrf' to distil chrF from a
        store scored by another reward); None keeps the stored rewards.
      rescore_batch_size: Pairs per reward call when re-scoring.
      max_examples: Keep a random subset of this size (seeded).
      seed: Seed of that subset.
    """
    dirs = [store_dir] if isinstance(store_dir, (str, os.PathLike)) else list(store_dir)
    parts = [store_lib.GrowStore(d).as_numpy(("source_text", "candidate_text", "reference_text", "reward",
                                              "is_reference")) for d in dirs]
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    keep = np.ones(len(cols["reward"]), bool) if include_references else ~cols["is_reference"].astype(bool)
    index = np.flatnonzero(keep)
    if max_examples is not None and len(index) > max_examples:
        index = np.sort(np.random.default_rng(seed).choice(index, max_examples, replace=False))
    sources = [str(cols["source_text"][i]) for i in index]
    candidates = [str(cols["candidate_text"][i]) for i in index]
    references = [str(cols["reference_text"][i]) for i in index]
    scores = cols["reward"][index]
    if rescore_with:
        teacher = rewards_base.get(rescore_with)
        scores = rewards_base.score_pairs(teacher, sources, candidates, references, batch_size=rescore_batch_size)
    origin = f"Grow store {dirs[0]}" if len(dirs) == 1 else f"Grow stores {', '.join(map(str, dirs))}"
    return RewardExamples(sources, candidates, references, scores, origin=origin)


def corrupt(reference: str, other: str, rng: np.random.Generator) -> str:
    """A synthetic candidate: `reference` damaged in one of the ways translations go wrong (*choice*).

    Operations (uniformly chosen): keep it; drop 1 to half of the words; swap adjacent words; replace words with
    words of `other` (another reference); truncate; repeat a span (over-translation, the reward hack ReST Sec. 4
    reports); return `other` whole (fluent but unrelated). The teacher metric gives each its score.
    """
    words = reference.split()
    others = other.split() or ["."]
    op = int(rng.integers(7))
    if not words or op == 0:
        return reference
    n = len(words)
    if op == 1:
        k = int(rng.integers(1, max(2, n // 2 + 1)))
        drop = set(rng.choice(n, size=min(k, n - 1) if n > 1 else 0, replace=False).tolist())
        words = [w for i, w in enumerate(words) if i not in drop]
    elif op == 2 and n > 1:
        for _ in range(int(rng.integers(1, max(2, n // 2 + 1)))):
            i = int(rng.integers(n - 1))
            words[i], words[i + 1] = words[i + 1], words[i]
    elif op == 3:
        for i in rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False):
            words[int(i)] = others[int(rng.integers(len(others)))]
    elif op == 4:
        words = words[:int(rng.integers(1, n + 1))]
    elif op == 5:
        i = int(rng.integers(n))
        j = int(rng.integers(i + 1, n + 1))
        words = words + words[i:j] * int(rng.integers(1, 3))
    elif op == 6:
        return other
    return " ".join(words)


def examples_from_parallel(sources: Sequence[str], references: Sequence[str], teacher: str = "chrf",
                           candidates_per_source: int = 4, include_references: bool = True, seed: int = 0,
                           batch_size: int = 65536) -> RewardExamples:
    """Distillation data from parallel text: synthetic candidates (`corrupt`) scored by a reference-based
    `teacher` reward against the reference."""
    if len(sources) != len(references) or not sources:
        raise ValueError(f"parallel text: {len(sources)} sources and {len(references)} references "
                         "(need equally many, at least one).")
    rng = np.random.default_rng(seed)
    src, cand, ref = [], [], []
    for s, r in zip(sources, references):
        if include_references:
            cand.append(r)
        for _ in range(candidates_per_source):
            other = references[int(rng.integers(len(references)))] if len(references) > 1 else r
            cand.append(corrupt(r, other, rng))
        count = candidates_per_source + int(include_references)
        src.extend([s] * count)
        ref.extend([r] * count)
    reward = rewards_base.get(teacher)
    scores = rewards_base.score_pairs(reward, src, cand, ref, batch_size=batch_size)
    return RewardExamples(src, cand, ref, scores, origin=f"parallel text scored by {teacher!r}")


def split_by_source(sources: Sequence[str], eval_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) example indices; a source's examples all fall on one side (stable text hash)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    buckets = np.array([zlib.crc32(f"{seed}:{s}".encode("utf-8")) % 10_000 for s in sources])
    held = buckets < int(round(eval_fraction * 10_000))
    return np.flatnonzero(~held), np.flatnonzero(held)


# ---------------------------------------------------------------------------------------------- metrics


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson of average ranks); NaN when either side is constant."""
    return pearson(_ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64)))


def regression_metrics(predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    predictions, targets = np.asarray(predictions, np.float64), np.asarray(targets, np.float64)
    return {"mse": float(np.mean((predictions - targets) ** 2)) if len(targets) else float("nan"),
            "pearson": pearson(predictions, targets), "spearman": spearman(predictions, targets),
            "num_examples": float(len(targets))}


# -------------------------------------------------------------------------------------------- training


def make_regression_loss_fn(model: heads.RegressionModel) -> trainer.LossFn:
    """MSE between the model's score and `batch['score']` (float32 [B] in [0, 1]), weighted by
    `batch['weight']` when present (0 for padding rows)."""

    def loss_fn(params: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array | None):
        pred = model.apply({"params": params}, batch["encoder_input_tokens"], enable_dropout=rng is not None,
                           rngs=None if rng is None else {"dropout": rng})
        target = batch["score"].astype(jnp.float32)
        weight = batch.get("weight", jnp.ones_like(target)).astype(jnp.float32)
        n = jnp.maximum(jnp.sum(weight), 1.0)
        mse = jnp.sum(weight * jnp.square(pred - target)) / n
        tokens = jnp.sum((batch["encoder_input_tokens"] > 0) * weight[:, None])
        return mse, {"mse": mse, "mean_prediction": jnp.sum(weight * pred) / n, "num_tokens": tokens}

    return loss_fn


def _batches(tokens: np.ndarray, scores: np.ndarray, batch_size: int, seed: int,
             start_step: int) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches; step s takes positions s*B .. s*B+B-1 of a stream of per-epoch permutations, so a
    resumed run sees exactly the batches an uninterrupted one would."""
    n = len(scores)
    cache: dict[int, np.ndarray] = {}

    def permutation(epoch: int) -> np.ndarray:
        if epoch not in cache:
            if len(cache) > 2:
                cache.clear()
            cache[epoch] = np.random.default_rng((seed, epoch)).permutation(n)
        return cache[epoch]

    step = start_step
    while True:
        pos = np.arange(step * batch_size, (step + 1) * batch_size)
        idx = np.array([permutation(int(p // n))[p % n] for p in pos], np.int64)
        yield {"encoder_input_tokens": tokens[idx], "score": scores[idx],
               "weight": np.ones(batch_size, np.float32)}
        step += 1


def make_predict_fn(model: heads.RegressionModel, mesh: jax.sharding.Mesh, rules: Any,
                    batch_size: int) -> Any:
    """`predict(params, tokens [n, L]) -> scores [n]` with (already placed) params, jitted once, rows sharded
    on 'batch' and padded to `batch_size`."""
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x), out_shardings=partitioning.replicated(mesh))

    def predict(params: PyTree, tokens: np.ndarray) -> np.ndarray:
        n = len(tokens)
        out = np.zeros(n, np.float32)
        for start in range(0, n, batch_size):
            chunk = tokens[start:start + batch_size]
            rows = np.zeros((batch_size, tokens.shape[1]), np.int32)
            rows[:len(chunk)] = chunk
            with partitioning.mesh_context(mesh, rules):
                scores = jax.device_get(apply(params, partitioning.shard_batch(rows, mesh, rules)))
            out[start:start + len(chunk)] = np.asarray(scores)[:len(chunk)]
        return out

    return predict


def _config_dict(config: T5Config) -> dict[str, Any]:
    fields = dataclasses.asdict(config)
    fields["mlp_activations"] = list(fields["mlp_activations"])
    return fields


def _data_axis_size(mesh: jax.sharding.Mesh, rules: Any) -> int:
    axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def train_reward_model(examples: RewardExamples, vocabulary: str, output_dir: str, *,
                       model: heads.RegressionModel, use_reference: bool = False, max_input_length: int = 256,
                       batch_size: int = 64, num_steps: int = 2000, eval_fraction: float = 0.05,
                       eval_period: int = 500, checkpoint_period: int = 500, keep_checkpoints: int | None = 2,
                       seed: int = 0, optimizer: optim.Optimizer | None = None,
                       mesh: jax.sharding.Mesh | None = None, init_params: Mapping[str, Any] | None = None,
                       init_head: bool = False, log_period: int = 50, show_progress: bool = True) -> dict[str, Any]:
    """Fits `model` to `examples` with the shared sharded train step and loop (`rest_jax.train`); resumable.

    Args:
      examples: Training data (split here into train / held-out by source).
      vocabulary: SentencePiece model path (copied into `output_dir`).
      output_dir: The reward model directory (module docstring); a rerun resumes from its latest checkpoint.
      model: The regression model (`heads.RegressionModel`).
      use_reference: Feed the reference too (a reference-based model); False gives a QE model.
      max_input_length: Tokens per input (EOS kept); longer inputs are trimmed.
      batch_size: Global batch (rounded up to a multiple of the data-parallel size).
      num_steps: Total train steps.
      eval_fraction: Fraction of sources held out for evaluation (0: none).
      eval_period: Steps between held-out evaluations (and at the end).
      checkpoint_period: Steps between checkpoints (and at the end).
      keep_checkpoints: Newest checkpoints kept.
      seed: Parameter init, data order, dropout and held-out split.
      optimizer: Default `optim.create_optimizer()` (gin).
      mesh: Default `partitioning.create_mesh()` (gin).
      init_params: Plain parameters (e.g. the BC policy's) whose trunk initialises the model
        (`heads.transplant_trunk`); the head starts fresh unless `init_head` (a reward model's own parameters).
      log_period: Steps between logged train scalars.
      show_progress: Progress bar / log lines.

    Returns:
      Summary: final step, train scalars, held-out metrics before and after training.
    """
    if use_reference and examples.references is None:
        raise ValueError(f"{examples.origin}: use_reference=True but the examples have no references.")
    out = epath.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_copy = out / VOCAB_FILE
    if not vocab_copy.exists():
        shutil.copyfile(vocabulary, os.fspath(vocab_copy) + ".tmp")
        os.replace(os.fspath(vocab_copy) + ".tmp", os.fspath(vocab_copy))
    vocab = seqio.SentencePieceVocabulary(os.fspath(vocab_copy))
    if vocab.vocab_size > model.config.vocab_size:
        raise ValueError(f"vocabulary {vocabulary} has {vocab.vocab_size} ids but the reward model's vocab_size "
                         f"is {model.config.vocab_size}; raise T5Config.vocab_size of the reward model.")
    mesh = mesh if mesh is not None else partitioning.create_mesh()
    rules = partitioning.standard_logical_axis_rules()
    ways = _data_axis_size(mesh, rules)
    if batch_size % ways:
        batch_size = -(-batch_size // ways) * ways
        logging.info("learned reward: batch size rounded up to %d (multiple of %d data-parallel devices).",
                     batch_size, ways)
    optimizer = optimizer if optimizer is not None else optim.create_optimizer()

    train_idx, eval_idx = split_by_source(examples.sources, eval_fraction, seed)
    if len(train_idx) == 0:
        raise ValueError(f"{examples.origin}: no training examples left after holding out {eval_fraction:.0%}.")
    refs = examples.references if use_reference else None
    # Padded to one width: the bucket list is that width alone (encode_inputs trims to it).
    tokens = decoding.pad_to_bucket(encode_inputs(vocab, examples.sources, examples.candidates, refs,
                                                  max_input_length), [max_input_length])
    train_tokens, train_scores = tokens[train_idx], examples.scores[train_idx]
    eval_tokens, eval_scores = tokens[eval_idx], examples.scores[eval_idx]

    description = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "model_config": _config_dict(model.config),
        "pooling": model.pooling, "output": model.output, "head_bias": model.head_bias,
        "use_reference": bool(use_reference), "max_input_length": int(max_input_length),
        "input_format": format_input("{source}", "{candidate}", "{reference}" if use_reference else None),
        "vocabulary": VOCAB_FILE, "vocabulary_origin": os.fspath(vocabulary),
        "data": {"origin": examples.origin, "num_examples": len(examples), "num_train": int(len(train_idx)),
                 "num_heldout": int(len(eval_idx)), "mean_score": float(np.mean(examples.scores))},
        "training": {"num_steps": int(num_steps), "batch_size": int(batch_size), "seed": int(seed)},
    }
    atomic.write_json(out / CONFIG_FILE, description)

    init_key = jax.random.key(seed)
    abstract, shardings = trainer.init_train_state(model, optimizer, init_key, mesh, rules,
                                                   input_length=max_input_length, abstract_only=True)
    manager = ckpt_lib.CheckpointManager(os.fspath(out / CHECKPOINT_DIR), keep=keep_checkpoints,
                                         keep_knob="train_learned_reward.keep_checkpoints",
                                         period=checkpoint_period)
    if manager.latest_step() is not None:
        state, _ = manager.restore(abstract, shardings=shardings)
        logging.info("learned reward: resuming %s at step %d.", out, int(state.step))
    else:
        state, _ = trainer.init_train_state(model, optimizer, init_key, mesh, rules, input_length=max_input_length)
        if init_params is not None:
            host = jax.device_get(state.params)
            params = heads.transplant_trunk(init_params, host, with_heads=init_head)
            state = state.replace(params=partitioning.Partitioner.create(mesh, rules).put(params, shardings.params))
    start = int(jax.device_get(state.step))

    predict = make_predict_fn(model, mesh, rules, batch_size)

    def eval_fn(st: trainer.TrainState, step: int) -> dict[str, float]:
        del step
        if not len(eval_idx):
            return {}
        return regression_metrics(predict(st.params, eval_tokens), eval_scores)

    initial = eval_fn(state, start) if start == 0 else {}
    loss_fn = make_regression_loss_fn(model)
    step_fn = trainer.make_train_step(optimizer, loss_fn, mesh=mesh, rules=rules, state_shardings=shardings,
                                      dropout_seed=seed)
    batches = _batches(train_tokens, train_scores, batch_size, seed, start)
    hooks = [trainer.LogMetrics(None, log_period),
             *([trainer.Evaluate(eval_fn, eval_period)] if len(eval_idx) else []),
             trainer.Checkpoint(manager, {"model_config": description["model_config"], "reward_model": True})]
    with trainer.error_advice(memory_knobs=("train_learned_reward.batch_size", "train_learned_reward.max_input_length"),
                              last_checkpoint=lambda: trainer.describe_last_checkpoint(manager)):
        state, summary = trainer.train_loop(state, batches, step_fn, num_steps, hooks=hooks, stage="reward_model",
                                            shard_fn=lambda b: partitioning.shard_batch(b, mesh, rules),
                                            show_progress=show_progress)
    manager.close()
    result = {"step": int(jax.device_get(state.step)), "heldout": summary.get("eval", {}),
              "heldout_initial": initial,
              "train": {k: v for k, v in summary.items() if isinstance(v, (int, float))}}
    description["result"] = result
    atomic.write_json(out / CONFIG_FILE, description)
    logging.info("learned reward: %s trained to step %d; held-out %s", out, result["step"], result["heldout"])
    return result


@gin.configurable(denylist=["reward_dir", "store_dirs", "output_dir", "seed", "mesh"])
def refresh_reward_model(reward_dir: str, store_dirs: Sequence[str], output_dir: str, *, teacher: str = "chrf",
                         num_steps: int = 200, batch_size: int = 64, eval_fraction: float = 0.1,
                         seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """The learned reward model `reward_dir` retrained on the Grow data so far (ReST Sec. 6, future work).

    A reward model trained before Grow scores samples from one policy; later policies sample elsewhere, where
    it was never fitted. This fits it again, from its own parameters (trunk and head), on every (source,
    candidate) of `store_dirs` scored by `teacher` (a reference-based metric standing in for new labels), and
    writes the result as a new reward model directory `output_dir` (the old one is kept). The held-out sources
    of those stores measure both versions against the teacher: `heldout_initial` (the old model) and `heldout`
    (the new one), in the returned summary and in `output_dir/reward_model.json` (`refresh`).

    Args:
      reward_dir: The reward model to refresh (a `train_learned_reward` output).
      store_dirs: The Grow stores so far.
      output_dir: The refreshed model's directory; a rerun resumes it.
      teacher: The registered reference-based reward that labels the stores' pairs.
      num_steps, batch_size, eval_fraction: Training (`train_reward_model`); the optimizer is gin's, scoped
        `reward_refresh/` when bound there.
      seed: Data order, dropout and the held-out split.
      mesh: Default `partitioning.create_mesh()`.
    """
    model, params, description = learned.load_reward_model(reward_dir)
    config_path = epath.Path(output_dir) / CONFIG_FILE
    earlier = (atomic.read_json(config_path).get("refresh", {}) if config_path.exists() else {})
    examples = examples_from_grow_store(store_dirs, include_references=True, rescore_with=teacher)
    with gin.config_scope("reward_refresh"):
        optimizer = optim.create_optimizer()
    config = T5Config(**description["model_config"])  # with its dropout: load_reward_model's is for inference
    model = heads.RegressionModel(config, pooling=model.pooling, output=model.output, head_bias=model.head_bias)
    result = train_reward_model(
        examples, os.path.join(reward_dir, description["vocabulary"]), output_dir, model=model,
        use_reference=description["use_reference"], max_input_length=description["max_input_length"],
        batch_size=batch_size, num_steps=num_steps, eval_fraction=eval_fraction, eval_period=num_steps,
        checkpoint_period=num_steps, seed=seed, optimizer=optimizer, mesh=mesh, init_params=params,
        init_head=True, show_progress=False)
    refreshed = atomic.read_json(config_path)
    if not result["heldout_initial"]:  # a resumed refresh measured the old model in its first run
        result["heldout_initial"] = earlier.get("heldout_initial", {})
    refreshed["refresh"] = {"from": os.fspath(reward_dir), "stores": [os.fspath(d) for d in store_dirs],
                            "teacher": teacher, "heldout_initial": result["heldout_initial"],
                            "heldout": result["heldout"]}
    atomic.write_json(config_path, refreshed)
    logging.info("Reward model refreshed on %d examples: held-out Spearman with %s %.3f -> %.3f (%s)",
                 len(examples), teacher, result["heldout_initial"].get("spearman", float("nan")),
                 result["heldout"].get("spearman", float("nan")), output_dir)
    return result


@gin.configurable
def train_learned_reward(output_dir: str = gin.REQUIRED, vocabulary: str = gin.REQUIRED,
                         grow_store: str | None = None, task: str | None = None, split: str = "train",
                         teacher: str = "chrf", rescore_with: str | None = None, candidates_per_source: int = 4,
                         include_references: bool = True, max_examples: int | None = None,
                         use_reference: bool = False, model_config: T5Config | None = None,
                         pooling: str = "mean", output: str = "sigmoid", head_bias: bool = True,
                         init_checkpoint: str | None = None, max_input_length: int = 256, batch_size: int = 64,
                         num_steps: int = 2000, eval_fraction: float = 0.05, eval_period: int = 500,
                         checkpoint_period: int = 500, seed: int = 0, optimizer: optim.Optimizer | None = None,
                         mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """Trains the `learned` reward model from gin (data from a Grow store or from a task's parallel text).

    Args:
      output_dir: Reward model directory (load it with `rewards.get('learned', model_dir=...)`).
      vocabulary: SentencePiece model (normally the policy's, so `init_checkpoint` can share embeddings).
      grow_store: A Grow store to learn from (its stored rewards, or `rescore_with`'s).
      task, split: Otherwise, a task whose parallel text gives sources and references; candidates are
        synthetic corruptions scored by `teacher` (`examples_from_parallel`).
      teacher: Reference-based reward scoring the synthetic candidates (task data).
      rescore_with: Re-score a Grow store's pairs with this reward (None: stored rewards).
      candidates_per_source: Synthetic candidates per source (task data).
      include_references: Also train on (source, reference) pairs.
      max_examples: Cap on the examples (random, seeded).
      use_reference: Reference-based model (False: reference-free QE model, the ReST setting).
      model_config: Shape of the reward model (gin: `train_learned_reward.model_config = @reward/T5Config()`);
        default `T5Config()` with its gin bindings.
      pooling, output, head_bias: `RegressionModel` knobs.
      init_checkpoint: A rest_jax checkpoint (e.g. the BC policy's `checkpoints/`) whose trunk initialises the
        model; its shape must equal `model_config`'s.
      max_input_length, batch_size, num_steps, eval_fraction, eval_period, checkpoint_period, seed, optimizer,
        mesh: see `train_reward_model`.

    Returns:
      The training summary (also in `output_dir/reward_model.json`).
    """
    if (grow_store is None) == (task is None):
        raise ValueError("train_learned_reward: set exactly one of grow_store (a Grow store directory) and task "
                         f"(parallel text + teacher reward); got grow_store={grow_store!r}, task={task!r}.")
    if grow_store is not None:
        examples = examples_from_grow_store(grow_store, include_references, rescore_with, max_examples=max_examples,
                                            seed=seed)
    else:
        sources, references = tasks.read_split(task, split)
        if max_examples is not None:
            keep = max(1, max_examples // (candidates_per_source + int(include_references)))
            sources, references = sources[:keep], references[:keep]
        examples = examples_from_parallel(sources, references, teacher, candidates_per_source, include_references,
                                          seed)
    model = heads.RegressionModel(model_config if model_config is not None else T5Config(), pooling=pooling,
                                  output=output, head_bias=head_bias)
    init_params = None
    if init_checkpoint:
        init_params = ckpt_lib.load_params(init_checkpoint)
    return train_reward_model(examples, vocabulary, output_dir, model=model, use_reference=use_reference,
                              max_input_length=max_input_length, batch_size=batch_size, num_steps=num_steps,
                              eval_fraction=eval_fraction, eval_period=eval_period,
                              checkpoint_period=checkpoint_period, seed=seed, optimizer=optimizer, mesh=mesh,
                              init_params=init_params)
