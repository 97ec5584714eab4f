"""The policy π_θ(y|x): a translation network with its vocabulary and parameters (ReST Sec. 2).

One object for what every stage does with the model: Grow samples from it and scores the references under it
(`generate`, `score`), Improve fine-tunes it (`replace` with the trained parameters; its losses call the same
network, plus the value heads of `rest_jax.model.heads`), evaluation and best-of-N decode with it (`generate`).
BC's loss on the network is `losses.make_loss_fn`; parameters are initialised by `trainer.init_train_state`,
directly in their shards (a policy too large for one device is never whole on one).

    policy = load_policy(checkpoint, vocabulary)          # the gin model, a checkpoint's parameters
    out = policy.generate(sources, method="sample", num_samples=8, temperature=0.8)
    log_probs = policy.score(source_tokens, reference_tokens)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np

from rest_jax import checkpoints
from rest_jax import convert
from rest_jax import decoding
from rest_jax import metrics as metrics_lib
from rest_jax import partitioning
from rest_jax.data import prompts
from rest_jax.data import vocab as vocab_lib
from rest_jax.data.special_tokens import EOS_ID
from rest_jax.model import decoder_only
from rest_jax.model import t5
from rest_jax.model import translation_lm

PyTree = Any


ARCHITECTURES = ("encoder_decoder", "decoder_only")
_REPORTED_MISMATCHES: set[str] = set()


@gin.configurable(denylist=["vocab"])
def build_network(vocab: Any = None, architecture: str = "encoder_decoder",
                  prompt_format: prompts.PromptFormat | None = None) -> nn.Module:
    """The policy network the gin config describes, either family behind the encoder-decoder's call.

    Args:
      vocab: The policy's vocabulary (a decoder-only network encodes its prompt template with it).
      architecture: 'encoder_decoder' (`t5.Transformer`, `T5Config.*` bindings) or 'decoder_only'
        (`translation_lm.TranslationLM`, `DecoderOnlyConfig.*` bindings; configs/models/decoder_only/ set it).
      prompt_format: How a decoder-only network is asked to translate; default `PromptFormat()` (gin).
    """
    if architecture == "encoder_decoder":
        return t5.build_model()
    if architecture != "decoder_only":
        raise ValueError(f"build_network.architecture must be one of {ARCHITECTURES}, got {architecture!r}.")
    if vocab is None:
        raise ValueError("A decoder-only policy needs its vocabulary to encode the prompt template.")
    prompt_format = prompt_format or prompts.PromptFormat()
    before, after = prompt_format.pieces(vocab)
    mismatch = prompt_format.boundary_mismatch(vocab)
    if mismatch and mismatch not in _REPORTED_MISMATCHES:  # once per process, not at every stage's build
        _REPORTED_MISMATCHES.add(mismatch)
        logging.warning("PromptFormat: %s. A policy trained by BC on these prompts learns them; a pre-trained LM "
                        "used without fine-tuning sees token joins it was not trained on (a byte-level BPE "
                        "tokenizer joins them as written with HuggingFaceVocabulary.add_prefix_space = True).",
                        mismatch)
    # A Hugging Face tokenizer's BOS opens the prompt, as in the LM's pre-training (`vocab.HuggingFaceVocabulary`).
    return translation_lm.TranslationLM(decoder_only.DecoderOnlyConfig(), prompt_before=before, prompt_after=after,
                                        eos_id=EOS_ID, start_id=getattr(vocab, "prompt_start_id",
                                                                        translation_lm.START_ID),
                                        stop=prompt_format.stop, stop_ids=prompt_format.stop_ids(vocab),
                                        stop_sequences=prompt_format.stop_sequences(vocab))


def _prompt(model: nn.Module) -> dict[str, list[int]] | None:
    """The tokens a decoder-only network asks with; None for T5."""
    if not isinstance(model, translation_lm.TranslationLM):
        return None
    return {"before": [model.start_id, *model.prompt_before], "after": list(model.prompt_after)}


def checkpoint_metadata(model: nn.Module) -> dict[str, Any]:
    """What a policy checkpoint records about its network: the config and family (`convert.config_metadata`,
    so `convert` exports it without gin) and, for a decoder-only network, its prompt tokens."""
    prompt = _prompt(model)
    return {**convert.config_metadata(model.config), **({"prompt": prompt} if prompt is not None else {})}


def check_prompt(model: nn.Module, metadata: Mapping[str, Any], checkpoint: str) -> None:
    """Refuses a decoder-only checkpoint trained with other prompt tokens than `model` makes: its translations
    would be silently poor."""
    recorded, mine = metadata.get("prompt"), _prompt(model)
    if recorded is not None and mine is not None and recorded != mine:
        raise ValueError(f"{checkpoint} was trained with the prompt tokens {recorded}, but this run's PromptFormat "
                         f"makes {mine}: bind PromptFormat.* as the run that trained it did (its config.gin).")


def init_params(model: nn.Module, rng: jax.Array) -> PyTree:
    """Boxed (logically partitioned) parameters of a network of `build_network`."""
    return t5.init_params(model, rng)


def tokenize(vocab: Any, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids with EOS appended, trimmed to `max_length` (EOS kept); also returns how many were trimmed."""
    out, trimmed = [], 0
    for text in texts:
        ids = list(vocab.encode(text))
        if len(ids) + 1 > max_length:
            trimmed += 1
            ids = ids[:max_length - 1]
        out.append(ids + [EOS_ID])
    return out, trimmed


def detokenize(vocab: Any, ids: Sequence[int], stop: str | None = None) -> str:
    """Text of `ids` up to (not including) the first EOS, and before the first `stop` (a decoder-only
    policy's `PromptFormat.stop`) where given."""
    ids = list(np.asarray(ids).tolist())
    if EOS_ID in ids:
        ids = ids[:ids.index(EOS_ID)]
    text = vocab.decode([i for i in ids if i > 0])
    return text.split(stop, 1)[0] if stop else text


def finished(model: Any, tokens: Sequence[int]) -> bool:
    """Whether a sampled completion ended itself (EOS, or a decoder-only policy's stop token or stop sequence)
    rather than at the length limit."""
    ids = [int(t) for t in tokens]
    return (len(ids) > 0 and ids[-1] in (EOS_ID, *getattr(model, "stop_ids", ()))) or \
        any(tuple(ids[-len(s):]) == tuple(s) for s in getattr(model, "stop_sequences", ()) if len(ids) >= len(s))


@dataclasses.dataclass
class Generations:
    """N candidates per source: texts [num_sources][N], token ids and per-token log-probs (unpadded)."""

    texts: list[list[str]]
    tokens: list[list[np.ndarray]]
    token_log_probs: list[list[np.ndarray]]

    def first(self) -> list[str]:
        return [c[0] for c in self.texts]


@dataclasses.dataclass
class Policy:
    """A network with its parameters and vocabulary: everything needed to translate and score.

    Attributes:
      model: The network (`build_network`: the encoder-decoder `t5.Transformer` or a decoder-only
        `translation_lm.TranslationLM`, T5X parameter names either way).
      params: Its parameters (host or placed arrays).
      vocab: The SentencePiece (or any seqio) vocabulary of sources and targets.
      checkpoint: The step directory `params` were loaded from (`load_policy`); None once they change.
    """

    model: nn.Module
    params: Any
    vocab: Any
    checkpoint: str | None = None

    def __post_init__(self):
        vocab_lib.check_fits_model(self.vocab, self.model.config.vocab_size, "The vocabulary",
                                   "use the policy's own vocabulary or set T5Config.vocab_size (VOCAB_SIZE) to "
                                   "match the checkpoint.")

    @property
    def config(self) -> t5.T5Config | decoder_only.DecoderOnlyConfig:
        return self.model.config

    def replace(self, params: Any) -> "Policy":
        """The same network and vocabulary with other parameters (e.g. a training step's)."""
        return dataclasses.replace(self, params=params, checkpoint=None)

    def score(self, source_tokens: Sequence[Sequence[int]], target_tokens: Sequence[Sequence[int]],
              batch_size: int = 64) -> list[np.ndarray]:
        """Per-token log π(y_t | y_<t, x) of given targets (ids with EOS), unpadded, float32.

        Grow uses it for the references (the behaviour policy's view of D, which offline-RL losses need).
        """
        out: list[np.ndarray] = []
        for start in range(0, len(source_tokens), batch_size):
            src = list(source_tokens[start:start + batch_size])
            tgt = list(target_tokens[start:start + batch_size])
            rows = len(src)
            src += [[EOS_ID]] * (batch_size - rows)  # Fixed batch shape: one compiled program.
            tgt += [[EOS_ID]] * (batch_size - rows)
            scores = np.asarray(decoding.token_scores(
                self.params, self.model,
                {"encoder_input_tokens": decoding.pad_to_bucket(src),
                 "decoder_target_tokens": decoding.pad_to_bucket(tgt)}))
            out.extend(scores[i, :len(tgt[i])].astype(np.float32) for i in range(rows))
        return out

    def generate(self, sources: Sequence[str], *, method: str = "greedy", num_samples: int = 1,
                 batch_size: int = 64, max_input_length: int = 128, max_decode_length: int = 128,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, beam_size: int = 4,
                 alpha: float = 0.6, seed: int = 0, progress_desc: str | None = None,
                 source_tokens: Sequence[Sequence[int]] | None = None,
                 split_across_processes: bool = False) -> Generations:
        """Translates `sources` with greedy decoding, beam search or temperature sampling (N per source).

        Sources are processed in batches of `batch_size`, padded to a few bucketed lengths so that XLA compiles
        few programs; the last batch is padded with empty rows that are dropped afterwards. Sampling keys are
        folded from `seed` and the batch index, so a given source's samples depend only on its position in
        `sources` (deterministic for a seed), not on the other sources.

        With `split_across_processes` (evaluation, best-of-N, Improve's validation), every process of a
        multi-process job must call this with the same sources: process i decodes batches i, i + P, ... and
        every process gets all results, the same as one process would make them (same batches, same keys).
        Grow, whose processes decode different sources, leaves it off.

        Not gin-configurable: each entry point owns its decoding knobs (`evaluate.beam_size`,
        `grow_dataset.temperature`, ...) and passes them, so no binding here could be silently overridden.
        """
        if method not in ("greedy", "beam", "sample"):
            raise ValueError(f"The decoding method must be 'greedy', 'beam' or 'sample', got {method!r}.")
        if source_tokens is None:
            source_tokens, trimmed = tokenize(self.vocab, sources, max_input_length)
            if trimmed:
                logging.info("%d of %d sources trimmed to %d tokens.", trimmed, len(sources), max_input_length)
        n = num_samples if method == "sample" else 1
        base_key = jax.random.PRNGKey(seed)
        split = split_across_processes and jax.process_count() > 1
        params = self.params
        if split and any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(params)):
            # Parameters on the global mesh (Improve's validation) would make every process join each batch's
            # program; each decodes its own batches with a local copy instead.
            params = partitioning.Partitioner.gather(params)
        mine = lambda b: not split or b % jax.process_count() == jax.process_index()  # noqa: E731
        starts = list(range(0, len(source_tokens), batch_size))
        per_batch: dict[int, tuple[list, list, list]] = {}
        bar = metrics_lib.progress(len(sources) * n, desc=progress_desc, unit="samples") if progress_desc else None
        for b, start in enumerate(starts):
            if not mine(b):
                continue
            texts, tokens, logps = per_batch.setdefault(b, ([], [], []))
            chunk = list(source_tokens[start:start + batch_size])
            rows = len(chunk)
            chunk += [[EOS_ID]] * (batch_size - rows)  # Fixed batch shape: one compiled program.
            enc = decoding.pad_to_bucket(chunk)
            if method == "beam":
                out = decoding.beam_search(params, self.model, enc, beam_size=beam_size, alpha=alpha,
                                           max_decode_len=max_decode_length)
                toks = np.asarray(out.tokens)[:, :1]
                lengths = np.asarray(out.lengths)[:, :1]
                lp = np.zeros(toks.shape, np.float32)
            else:
                out = decoding.sample(params, self.model, enc, jax.random.fold_in(base_key, b),
                                      num_samples=n, max_decode_len=max_decode_length,
                                      temperature=0.0 if method == "greedy" else temperature, top_k=top_k,
                                      top_p=top_p)
                toks, lengths, lp = (np.asarray(x) for x in (out.tokens, out.lengths, out.token_log_probs))
            for i in range(rows):
                row_toks = [toks[i, j, :lengths[i, j]] for j in range(n)]
                tokens.append(row_toks)
                logps.append([lp[i, j, :lengths[i, j]] for j in range(n)])
                texts.append([detokenize(self.vocab, t, getattr(self.model, "stop", None)) for t in row_toks])
            if bar is not None:
                bar.update(rows * n)
        if bar is not None:
            bar.close()
        if split:
            per_batch = {b: out for gathered in partitioning.allgather_objects(per_batch)
                         for b, out in gathered.items()}
        ordered = [per_batch[b] for b in range(len(starts))]
        return Generations([t for o in ordered for t in o[0]], [t for o in ordered for t in o[1]],
                           [t for o in ordered for t in o[2]])


def load_policy(checkpoint: str, vocabulary: str, step: int | None = None) -> Policy:
    """The gin model with the parameters of `checkpoint` (a run's `checkpoints/` dir or one step).

    Not a gin configurable: the subcommands take `checkpoint` and `vocabulary` as their own knobs (e.g.
    `evaluate.checkpoint = %CHECKPOINT` in configs/runs/eval.gin) and pass them here, so that one binding,
    not two, says which checkpoint runs.
    """
    vocab = vocab_lib.load_vocabulary(vocabulary)
    model = build_network(vocab)
    abstract = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.PRNGKey(0))))
    step_dir = checkpoints.step_directory(checkpoint, step)
    check_prompt(model, checkpoints.read_metadata(step_dir), step_dir)
    return Policy(model, checkpoints.load_params(step_dir, target=abstract), vocab, step_dir)
