"""`learned` reward: our own T5 regression model of R(x, y), loaded from a reward model directory.

ReST (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 4) scores Grow samples with a learned, reference-free metric
(Metric X). Where no such model exists for a language pair, `rest_jax.reward_model` trains one (`rest_jax
reward-model`): a T5 encoder (masked mean pooling) or encoder-decoder (first decoder step) with a sigmoid
regression head (`rest_jax.model.heads.RegressionModel`), fitted by MSE to scores in [0, 1]. This module is the
reward side: the input format both share and `LearnedReward`, which scores with a trained model.

Input text (MetricX-24's layout): "source: {source} candidate: {candidate}", plus " reference: {reference}" for a
reference-based model; SentencePiece ids with EOS, trimmed to `max_input_length` (EOS kept).

Model directory layout (what the `learned` reward loads):
    reward_model.json   format, model config, pooling/output, input format, max length, data and eval summary
    vocab.model         the SentencePiece model used (copied, so the directory is self-contained)
    checkpoints/<step>/ rest_jax.checkpoints train state (params with T5X names + regression_head)

Map to [0, 1]: the model is trained on [0, 1] targets; a sigmoid head is already in (0, 1), a linear head is
clipped to [0, 1].
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
import seqio
from etils import epath

from rest_jax import checkpoints as ckpt_lib
from rest_jax.data.special_tokens import EOS_ID
from rest_jax.model import heads
from rest_jax.model.t5 import T5Config
from rest_jax.rewards.base import Reward, register

FORMAT_NAME = "rest_jax.learned_reward"
FORMAT_VERSION = 1
CONFIG_FILE = "reward_model.json"
VOCAB_FILE = "vocab.model"
CHECKPOINT_DIR = "checkpoints"

PyTree = Any


# ------------------------------------------------------------------------------------------------ inputs


def format_input(source: str, candidate: str, reference: str | None = None) -> str:
    """The model's input text: 'source: S candidate: C' (+ ' reference: R' when a reference is given)."""
    text = f"source: {source} candidate: {candidate}"
    return text if reference is None else f"{text} reference: {reference}"


def encode_inputs(vocab: seqio.SentencePieceVocabulary, sources: Sequence[str], candidates: Sequence[str],
                  references: Sequence[str] | None, max_input_length: int) -> list[list[int]]:
    """Token ids of the formatted inputs, EOS appended, trimmed to `max_input_length` (EOS kept)."""
    if max_input_length < 2:
        raise ValueError(f"max_input_length must be >= 2, got {max_input_length}")
    refs = [None] * len(candidates) if references is None else references
    texts = [format_input(s, c, r) for s, c, r in zip(sources, candidates, refs)]
    ids = vocab.tokenizer.encode(texts, out_type=int)
    return [list(row[:max_input_length - 1]) + [EOS_ID] for row in ids]


# ----------------------------------------------------------------------------------------------- reward


def load_reward_model(model_dir: str, step: int | None = None) -> tuple[heads.RegressionModel, PyTree, dict]:
    """(model, plain params, reward_model.json) of a directory written by `train_reward_model`."""
    folder = epath.Path(model_dir) if model_dir else None
    if folder is None or not (folder / CONFIG_FILE).exists():
        raise FileNotFoundError(f"learned reward model not found: {model_dir!r} has no {CONFIG_FILE}. Train one "
                                "with `rest_jax reward-model` (rest_jax.reward_model.train_learned_reward) and set "
                                "LearnedReward.model_dir to its output_dir.")
    description = json.loads((folder / CONFIG_FILE).read_text())
    if description.get("format") != FORMAT_NAME or description.get("version") != FORMAT_VERSION:
        raise ValueError(f"{folder / CONFIG_FILE}: not a {FORMAT_NAME} v{FORMAT_VERSION} file "
                         f"(format={description.get('format')!r}, version={description.get('version')!r}).")
    config = T5Config(**description["model_config"])
    model = heads.RegressionModel(config.replace(dropout_rate=0.0), pooling=description["pooling"],
                                  output=description["output"], head_bias=description["head_bias"])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(heads.abstract_params(model)))
    params = ckpt_lib.load_params(os.fspath(folder / CHECKPOINT_DIR), target=target, step=step)
    return model, params, description


@register("learned")
@gin.configurable
class LearnedReward(Reward):
    """A reward model trained by `train_learned_reward`; scores in [0, 1] (sigmoid, or a clipped linear head).

    Reference-free unless the model was trained with `use_reference=True` (then `references` are required).

    Args:
      model_dir: The reward model directory.
      batch_size: Pairs per device batch.
      step: Checkpoint step (default: latest).
      min_length: Smallest padded length bucket.
      mesh: Device mesh; default `partitioning.create_mesh()`.
    """

    name = "learned"

    def __init__(self, model_dir: str | None = None, batch_size: int = 64, step: int | None = None,
                 min_length: int = 32, mesh: jax.sharding.Mesh | None = None):
        model, params, description = load_reward_model(model_dir, step)
        self.model_dir = os.fspath(model_dir)
        self.description = description
        self.needs_reference = bool(description["use_reference"])
        self.max_input_length = int(description["max_input_length"])
        self.vocab = seqio.SentencePieceVocabulary(os.path.join(self.model_dir, description["vocabulary"]))
        self.scorer = heads.RegressionScorer(model, params, mesh, batch_size=batch_size,
                                             min_length=min(min_length, self.max_input_length),
                                             max_length=self.max_input_length,
                                             source=f"learned reward model {self.model_dir}")

    def _score(self, sources: list[str], candidates: list[str], references: list[str] | None) -> np.ndarray:
        refs = references if self.needs_reference else None
        scores = self.scorer(encode_inputs(self.vocab, sources, candidates, refs, self.max_input_length))
        return np.clip(scores, 0.0, 1.0)
