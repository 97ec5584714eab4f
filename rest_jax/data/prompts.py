"""Translation as prompt + completion, the data of ReST on a decoder-only LM (issue 17).

A (source, target) pair becomes one token sequence: the prompt (`PromptFormat`, e.g. "Translate German to
English.\\nGerman: <source>\\nEnglish:") followed by the target and EOS. Batches use T5X's decoder-only features
(`t5x.models.DecoderOnlyModel`): `decoder_target_tokens` is the whole sequence, `decoder_input_tokens` the
same shifted right behind the start token 0, and `decoder_loss_weights` is 1 on the completion (target and
EOS) only, so behaviour cloning (ReST Sec. 2) learns p(target | prompt) and never the prompt itself. For
sampling, `prompt_batch` left-pads the start token and prompt so that all rows end together
(`decoding.sample_lm`); its positions then match training's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import gin
import numpy as np

from rest_jax.data.vocab import EOS_ID

START_ID = 0  # T5X's decoder start token, shifted in front of every sequence (also the padding id)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a source sentence is asked for its translation; `{source}`, `{source_language}` and
    `{target_language}` are filled in. The completion is the target alone (then EOS)."""

    template: str = "Translate {source_language} to {target_language}.\n{source_language}: {source}\n{target_language}:"
    source_language: str = "German"
    target_language: str = "English"

    def prompt(self, source: str) -> str:
        return self.template.format(source=source, source_language=self.source_language,
                                    target_language=self.target_language)


def encode_pairs(vocab: Any, sources: Sequence[str], targets: Sequence[str] | None, prompt_format: PromptFormat,
                 max_prompt_length: int, max_target_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and completion ids (target + EOS) of each pair; no targets: empty completions (sampling).

    A prompt longer than `max_prompt_length` loses tokens from the middle of the source, keeping the
    instruction before it and the cue after it ("English:"), without which the model would not know where to
    start; a target longer than `max_target_length` is cut, its last token EOS.
    """
    prompts, completions = [], []
    for i, source in enumerate(sources):
        ids = list(vocab.encode(prompt_format.prompt(source)))
        if len(ids) > max_prompt_length:
            before, after = prompt_format.template.split("{source}", 1)
            head = len(vocab.encode(before.format(source_language=prompt_format.source_language,
                                                  target_language=prompt_format.target_language)))
            tail = len(vocab.encode(after.format(source_language=prompt_format.source_language,
                                                 target_language=prompt_format.target_language)))
            if head + tail >= max_prompt_length:
                raise ValueError(f"max_prompt_length={max_prompt_length} does not fit the prompt format's own "
                                 f"{head + tail} tokens (PromptFormat.template).")
            ids = ids[:max_prompt_length - tail] + ids[len(ids) - tail:]
        prompts.append(ids)
        target = [] if targets is None else list(vocab.encode(targets[i]))[:max_target_length - 1] + [EOS_ID]
        completions.append(target)
    return prompts, completions


def lm_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], length: int
             ) -> dict[str, np.ndarray]:
    """T5X decoder-only features of prompt + completion rows, right-padded to `length` (longer rows raise)."""
    rows = len(prompts)
    targets = np.zeros((rows, length), np.int32)
    weights = np.zeros((rows, length), np.float32)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        if len(p) + len(c) > length:
            raise ValueError(f"row {r}: {len(p)} prompt + {len(c)} completion tokens exceed length {length}.")
        targets[r, :len(p) + len(c)] = list(p) + list(c)
        weights[r, len(p):len(p) + len(c)] = 1.0
    inputs = np.concatenate([np.full((rows, 1), START_ID, np.int32), targets[:, :-1]], axis=1)
    return {"decoder_input_tokens": inputs, "decoder_target_tokens": targets, "decoder_loss_weights": weights}


def prompt_batch(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Start token + prompt per row, left-padded to the longest: (tokens [b, P], mask [b, P]) for
    `decoding.sample_lm` (the start token is real: mask True)."""
    width = 1 + max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for r, p in enumerate(prompts):
        tokens[r, width - 1 - len(p):] = [START_ID, *p]
        mask[r, width - 1 - len(p):] = True
    return tokens, mask
