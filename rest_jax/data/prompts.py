"""Translation as prompt + completion, the data of ReST on a decoder-only LM (issue 17).

A (source, target) pair is asked as a prompt (`PromptFormat`, e.g. "Translate German to English.\\nGerman:
<source>\\nEnglish:") followed by the completion, the target and EOS; behaviour cloning (ReST Sec. 2) learns
p(target | prompt) with the loss on the completion only. The prompt is made of token pieces: the template's
text before `{source}` and after it are encoded once (`PromptFormat.pieces`) and put around the source's own
tokens, so that batches of already tokenized sources (SeqIO tasks, Grow stores) and sampling make the same
prompts. `rest_jax.model.translation_lm` assembles them inside the model call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a source sentence is asked for its translation; `{source_language}` and `{target_language}` are
    filled in, `{source}` (once) stands for the source's tokens. The completion is the target alone (then EOS).

    The default suits a model trained from scratch or a base LM; an instruction-tuned checkpoint wants its own
    chat template here.
    """

    template: str = "Translate {source_language} to {target_language}.\n{source_language}: {source}\n{target_language}:"
    source_language: str = "German"
    target_language: str = "English"

    def __post_init__(self):
        if self.template.count("{source}") != 1:
            raise ValueError(f"PromptFormat.template must contain '{{source}}' exactly once, got {self.template!r}.")

    def pieces(self, vocab: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Token ids of the template before and after `{source}` (encoded separately, as fixed pieces)."""
        before, after = self.template.split("{source}")
        names = {"source_language": self.source_language, "target_language": self.target_language}
        try:
            texts = before.format(**names), after.format(**names)
        except (KeyError, IndexError) as e:
            raise ValueError(f"PromptFormat.template {self.template!r} names an unknown field {e}; it may use "
                             "{source}, {source_language} and {target_language}.") from None
        return tuple(int(i) for i in vocab.encode(texts[0])), tuple(int(i) for i in vocab.encode(texts[1]))
