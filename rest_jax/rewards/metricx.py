"""`metricx` reward: MetricX-23/24 (Juraska et al., WMT 2023 / 2024) as a JAX mT5 regression model.

ReST (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 4) scores Grow samples with Metric X, a learned metric
trained on human judgements, normalised to [0, 1]. The public MetricX checkpoints (google-research/metricx,
e.g. `google/metricx-24-hybrid-large-v2p6`, `google/metricx-23-qe-large-v2p0` on Hugging Face) are mT5
encoder-decoders in the HF layout (`config.json` + weights, class `MT5ForRegression`). Facts of that reference
implementation that this module reproduces (read from google-research/metricx `metricx2{3,4}/models.py` and
`predict.py`):

* Score = the decoder's output logit at vocabulary id 250089 (`<extra_id_10>`) after ONE decoder step fed the
  start token 0, attending to the whole encoder output; clipped to [0, 25]; lower is better (an MQM-like error
  score). The output projection is `lm_head`, preceded by a d_model**-0.5 rescale only when the config's
  `tie_word_embeddings` is true (false in the published files, and MetricX's transformers 4.30 default).
* Input text:
      MetricX-24, reference-based: "source: {src} candidate: {hyp} reference: {ref}"
      MetricX-24, QE:              "source: {src} candidate: {hyp}"
      MetricX-23, reference-based: "candidate: {hyp} reference: {ref}"
      MetricX-23, QE:              "candidate: {hyp} source: {src}"
  (MetricX-24 models are hybrid: the same checkpoint does both; MetricX-23 has separate QE checkpoints.)
* Tokenizer: mT5's SentencePiece model (`google/mt5-xl`'s `spiece.model`, = T5's mc4.250000.100extra). The HF
  tokenizer appends EOS and truncates to `max_input_length` tokens (EOS kept), then MetricX REMOVES the last
  token (the EOS): the model sees at most max_input_length - 1 tokens and no EOS. Here: SentencePiece ids,
  truncated to max_input_length - 1, no EOS. Recommended max_input_length: 1536 (24), 1024 (23).

Map to [0, 1]: reward = 1 - clip(score, 0, 25) / 25 (linear, so reward differences stay proportional to
MetricX differences; 0 errors -> 1, the worst score 25 -> 0). The paper does not give its map (REST.md:
*choice*).

Weights are loaded with `rest_jax.convert.load_hf_checkpoint` (float32; bfloat16 files are upcast) and placed on
the device mesh by their logical axes; only the one used column of the 250k-wide output projection is kept.
Scoring is batched and jitted with explicit shardings (`rest_jax.model.heads.RegressionScorer`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import gin
import jax
import numpy as np
import seqio
from etils import epath

from rest_jax import convert
from rest_jax.model import heads
from rest_jax.model.t5 import T5Config
from rest_jax.rewards.base import Reward, register

METRICX_SCORE_TOKEN_ID = 250089  # <extra_id_10> in mT5's vocabulary.
MAX_SCORE = 25.0
DEFAULT_MAX_INPUT_LENGTH = {23: 1024, 24: 1536}
VERSIONS = (23, 24)
_VOCAB_NAMES = ("spiece.model", "sentencepiece.model")
_DOWNLOAD_HINT = (
    "MetricX weights are not bundled with rest_jax and must be downloaded by the user, e.g. "
    "`huggingface-cli download google/metricx-24-hybrid-large-v2p6 --local-dir DIR` (or a MetricX-23 model such "
    "as google/metricx-23-qe-large-v2p0), plus mT5's tokenizer: `huggingface-cli download google/mt5-xl "
    "spiece.model --local-dir DIR`. Then set gin `MetricXReward.checkpoint_path` (and `vocab_path` if "
    "spiece.model is not in that folder).")


def format_input(source: str, candidate: str, reference: str | None, version: int = 24,
                 qe: bool = True) -> str:
    """The MetricX input text of one example (see the module docstring for the four formats)."""
    if version not in VERSIONS:
        raise ValueError(f"MetricX version must be one of {VERSIONS}, got {version!r}")
    if not qe and reference is None:
        raise ValueError("reference-based MetricX (qe=False) needs a reference, got None")
    if version == 24:
        text = f"source: {source} candidate: {candidate}"
        return text if qe else f"{text} reference: {reference}"
    return f"candidate: {candidate} source: {source}" if qe else f"candidate: {candidate} reference: {reference}"


def find_vocabulary(vocab_path: str | None, checkpoint_path: str | None = None) -> str:
    """The SentencePiece model file: `vocab_path` (a file or a folder holding spiece.model), else the checkpoint
    folder's spiece.model / sentencepiece.model. Raises FileNotFoundError naming what was tried."""
    tried = []
    candidates = []
    if vocab_path:
        path = epath.Path(vocab_path)
        candidates = [path] if not path.is_dir() else [path / n for n in _VOCAB_NAMES]
    elif checkpoint_path:
        candidates = [epath.Path(checkpoint_path) / n for n in _VOCAB_NAMES]
    for path in candidates:
        tried.append(os.fspath(path))
        if path.is_file():
            return os.fspath(path)
    raise FileNotFoundError(
        f"MetricX tokenizer not found (tried {tried or 'nothing: vocab_path is unset'}). MetricX uses mT5's "
        f"SentencePiece model; set gin `MetricXReward.vocab_path`. {_DOWNLOAD_HINT}")


def tokenize(vocab: seqio.SentencePieceVocabulary, texts: Sequence[str], max_input_length: int) -> list[list[int]]:
    """SentencePiece ids as MetricX feeds them: truncated to max_input_length - 1 tokens, no EOS."""
    if max_input_length < 2:
        raise ValueError(f"max_input_length must be >= 2 (one slot is the removed EOS), got {max_input_length}")
    ids = vocab.tokenizer.encode(list(texts), out_type=int)
    return [list(row[:max_input_length - 1]) for row in ids]


def _score_vector(config: T5Config, params: dict[str, Any], hf_config: dict[str, Any], token_id: int,
                  source: str) -> np.ndarray:
    """The vector w with score = decoder_state . w, following MetricX's definition (module docstring).

    `convert` may already have folded a d_model**-0.5 rescale into `logits_dense` or tied it to the embedding
    under transformers-5 rules; undo that, then apply MetricX's own rule.
    """
    embedding = np.asarray(params["token_embedder"]["embedding"], np.float32)
    if not 0 <= token_id < embedding.shape[0]:
        raise ValueError(f"{source}: score token id {token_id} is outside the vocabulary "
                         f"(vocab_size={embedding.shape[0]}); MetricX uses {METRICX_SCORE_TOKEN_ID}.")
    scale = np.float32(config.emb_dim ** -0.5)
    if config.logits_via_embedding:
        row, tied = embedding[token_id], True
    else:
        _, convert_scaled = convert.config_from_hf(hf_config, source)
        row = np.asarray(params["decoder"]["logits_dense"]["kernel"][:, token_id], np.float32)
        if convert_scaled:
            row = row / scale
        tied = bool(np.allclose(row, embedding[token_id], rtol=1e-6, atol=0.0))
    # MetricX (transformers 4.30, MT5Config default tie_word_embeddings=False) rescales iff the config ties;
    # a transformers-5 file says "tie" for every mT5 but keeps its own lm_head: follow the weights then.
    if tied and bool(hf_config.get("tie_word_embeddings", False)):
        row = row * scale
    return row


def load_metricx_model(checkpoint_path: str, score_token_id: int = METRICX_SCORE_TOKEN_ID,
                       dtype: str = "float32") -> tuple[heads.RegressionModel, dict[str, Any]]:
    """A MetricX HF folder as (RegressionModel with first-decoder-step pooling, plain parameters).

    The regression head is the output projection's column `score_token_id` (no bias, linear output); the
    returned model gives the unclipped MetricX score.
    """
    folder = epath.Path(checkpoint_path) if checkpoint_path else None
    if folder is None or not folder.exists():
        raise FileNotFoundError(f"MetricX checkpoint not found: {checkpoint_path!r} does not exist. {_DOWNLOAD_HINT}")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"MetricX checkpoint {folder} has no config.json (expected a Hugging Face "
                                f"folder: config.json + model.safetensors). {_DOWNLOAD_HINT}")
    hf_config = json.loads((folder / "config.json").read_text())
    config, params = convert.load_hf_checkpoint(folder)
    if "decoder" not in params:
        raise ValueError(f"{folder}: an encoder-only checkpoint; MetricX needs the encoder-decoder "
                         "(its score is read at the first decoder step).")
    w = _score_vector(config, params, hf_config, score_token_id, os.fspath(folder / "config.json"))
    params = dict(params)
    params["decoder"] = {k: v for k, v in params["decoder"].items() if k != "logits_dense"}
    params["regression_head"] = {"kernel": w[:, None]}
    model = heads.RegressionModel(config.replace(dtype=dtype, dropout_rate=0.0), pooling="first_decoder_step",
                                  output="linear", head_bias=False)
    return model, params


@register("metricx")
@gin.configurable
class MetricXReward(Reward):
    """MetricX-23/24 as a ReST reward: 1 - clip(MetricX, 0, 25) / 25 (module docstring has the details).

    Args:
      checkpoint_path: HF MetricX folder (config.json + model.safetensors / pytorch_model.bin).
      vocab_path: mT5 SentencePiece model file, or a folder holding spiece.model; default: the checkpoint folder.
      version: 23 or 24 (input format).
      qe: Reference-free (quality estimation) mode: the reference is not used. ReST's reward is reference-free.
        MetricX-23 needs a QE checkpoint for it; MetricX-24 checkpoints do both.
      batch_size: Pairs per device batch (rounded up to a multiple of the data-parallel size).
      max_input_length: Token budget as in MetricX's predict.py (the model sees one fewer); default 1536 for 24,
        1024 for 23. Longer inputs are truncated, as MetricX does.
      score_token_id: Vocabulary id whose logit is the score (MetricX: 250089).
      dtype: Activation dtype, 'float32' or 'bfloat16' (faster on TPU; scores move by ~0.01).
      min_length: Smallest padded length bucket.
      mesh: Device mesh; default `partitioning.create_mesh()` (the policy's, under the same gin).
    """

    name = "metricx"

    def __init__(self, checkpoint_path: str | None = None, vocab_path: str | None = None, version: int = 24,
                 qe: bool = True, batch_size: int = 64, max_input_length: int | None = None,
                 score_token_id: int = METRICX_SCORE_TOKEN_ID, dtype: str = "float32", min_length: int = 32,
                 mesh: jax.sharding.Mesh | None = None):
        if version not in VERSIONS:
            raise ValueError(f"MetricXReward.version must be one of {VERSIONS}, got {version!r}")
        if not checkpoint_path:
            raise FileNotFoundError(f"MetricX checkpoint path is not set (MetricXReward.checkpoint_path="
                                    f"{checkpoint_path!r}). {_DOWNLOAD_HINT}")
        self.version = version
        self.qe = bool(qe)
        self.needs_reference = not self.qe
        self.max_input_length = int(max_input_length or DEFAULT_MAX_INPUT_LENGTH[version])
        self.checkpoint_path = os.fspath(checkpoint_path)
        model, params = load_metricx_model(self.checkpoint_path, score_token_id, dtype)
        self.vocab = seqio.SentencePieceVocabulary(find_vocabulary(vocab_path, self.checkpoint_path))
        if self.vocab.tokenizer.get_piece_size() > model.config.vocab_size:
            raise ValueError(f"MetricX tokenizer {find_vocabulary(vocab_path, self.checkpoint_path)} has "
                             f"{self.vocab.tokenizer.get_piece_size()} pieces but the model's vocab_size is "
                             f"{model.config.vocab_size}: wrong vocabulary for this checkpoint.")
        self.scorer = heads.RegressionScorer(model, params, mesh, batch_size=batch_size,
                                             min_length=min(min_length, self.max_input_length - 1),
                                             max_length=self.max_input_length - 1,
                                             source=f"MetricX checkpoint {self.checkpoint_path}")
        logging.info("metricx: MetricX-%d (%s) from %s, max_input_length=%d", version, "QE" if qe else "ref",
                     self.checkpoint_path, self.max_input_length)

    def inputs(self, sources: Sequence[str], candidates: Sequence[str],
               references: Sequence[str] | None) -> list[str]:
        """The MetricX input texts."""
        refs = [None] * len(candidates) if references is None or self.qe else references
        return [format_input(s, c, r, self.version, self.qe) for s, c, r in zip(sources, candidates, refs)]

    def metricx_scores(self, sources: Sequence[str], candidates: Sequence[str],
                       references: Sequence[str] | None = None, clip: bool = True) -> np.ndarray:
        """MetricX's own scores (lower is better), clipped to [0, 25] unless `clip` is False."""
        tokens = tokenize(self.vocab, self.inputs(sources, candidates, references), self.max_input_length)
        raw = self.scorer(tokens)
        return np.clip(raw, 0.0, MAX_SCORE) if clip else raw

    def _score(self, sources: list[str], candidates: list[str], references: list[str] | None) -> np.ndarray:
        scores = self.metricx_scores(sources, candidates, references).astype(np.float64)
        return (1.0 - scores / MAX_SCORE).astype(np.float32)
