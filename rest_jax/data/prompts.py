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

    The default suits a model trained from scratch or a base LM. An instruction-tuned checkpoint is asked in its
    chat format: with `chat`, the filled template is the user's message (after an optional `system` message),
    rendered by the tokenizer's chat template with the assistant's turn opened (`HuggingFaceVocabulary.
    render_chat`), and the completion is the assistant's answer, ended by the vocabulary's EOS (for chat models
    the end-of-turn token, e.g. Llama 3's <|eot_id|>).

    Attributes:
      template: The request, with `{source}` once and optionally `{source_language}`, `{target_language}`.
      source_language, target_language: The names filled in.
      chat: Wrap the request in the tokenizer's chat template (a Hugging Face tokenizer with one).
      system: A system message before the request (chat only; None: none).
      stop: Text that also ends a completion (besides EOS), e.g. "\n" for a pre-trained base LM asked in a
        one-line format, which would otherwise write on past its translation. Sampling stops at any token
        whose text contains it (`stop_ids`) and after the stop's own token sequences (`stop_sequences`, for
        a stop that no single token holds, e.g. "###" or "German:"); the translation's text ends before it,
        and a stop ends a Grow sample as EOS does (the policy learns either end). None: EOS alone.
    """

    template: str = "Translate {source_language} to {target_language}.\n{source_language}: {source}\n{target_language}:"
    source_language: str = "German"
    target_language: str = "English"
    chat: bool = False
    system: str | None = None
    stop: str | None = None

    def __post_init__(self):
        if self.template.count("{source}") != 1:
            raise ValueError(f"PromptFormat.template must contain '{{source}}' exactly once, got {self.template!r}.")
        if self.system is not None and not self.chat:
            raise ValueError("PromptFormat.system is a chat message: set PromptFormat.chat = True too.")
        if self.stop is not None and not self.stop:
            raise ValueError("PromptFormat.stop must be a non-empty string, or None (EOS alone ends a completion).")

    def stop_ids(self, vocab: Any) -> tuple[int, ...]:
        """The ids of every token whose text contains `stop` (none without one): sampling ends a completion at
        any of them."""
        if self.stop is None:
            return ()
        decode = getattr(vocab, "decode_as_is", vocab.decode)
        return tuple(i for i in range(2, vocab.vocab_size) if self.stop in decode([i]))  # not pad 0, EOS 1

    def stop_sequences(self, vocab: Any) -> tuple[tuple[int, ...], ...]:
        """The stop's own encodings of two or more tokens (as written, and as a word when the vocabulary
        encodes words with their leading space): sampling ends a completion after any of them. A model may
        write the stop with other tokens (joined with the text before it); sampling then runs on to EOS or
        the length limit, and the translation's text is still cut before the stop (`policy.detokenize`)."""
        if self.stop is None:
            return ()
        encodings = [list(vocab.encode(self.stop))]
        if hasattr(vocab, "encode_as_is"):
            encodings.insert(0, list(vocab.encode_as_is(self.stop)))
        return tuple(dict.fromkeys(tuple(int(i) for i in ids) for ids in encodings
                                   if len(ids) >= 2 and min(ids) >= 2))  # pad 0 and EOS 1 never stop a text

    def pieces(self, vocab: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Token ids of the template before and after `{source}`, each encoded alone as written. A vocabulary
        that encodes every text with a word's leading space (`HuggingFaceVocabulary.add_prefix_space`) brings
        the space before the source and the completion itself, so the template's trailing spaces are left out
        (SentencePiece drops them anyway)."""
        encode = getattr(vocab, "encode_as_is", vocab.encode)
        word_initial = getattr(vocab, "add_prefix_space", False)
        return tuple(tuple(int(i) for i in encode(text.rstrip(" ") if word_initial else text))
                     for text in self._texts(vocab))

    def boundary_mismatch(self, vocab: Any, source: str = "Das Haus ist klein.",
                          target: str = "The house is small.") -> str | None:
        """Where the prompt assembled from its pieces (`pieces`, the source's and the target's own ids) is not
        the tokenization of the whole text, a description of the first difference; None where they agree.
        The target follows the prompt after a space, or directly when the prompt ends in other whitespace (a
        chat template's assistant header).

        SentencePiece vocabularies (T5's, the demo's) agree. A byte-level BPE (GPT-2, Llama 3) attaches a word's
        leading space to the word: "German: " + "Das" becomes ':', ' ', 'Das' where the whole text has ':', ' Das',
        unless the vocabulary encodes words with it (`HuggingFaceVocabulary.add_prefix_space = True`). A policy
        fine-tuned by BC on these prompts learns them; a pre-trained LM asked without fine-tuning sees token
        joins it was not trained on.
        """
        before, after = self._texts(vocab)
        join = "" if (after[-1:].isspace() or not after) else " "
        head, tail = self.pieces(vocab)
        assembled = [*head, *(int(i) for i in vocab.encode(source)), *tail, *(int(i) for i in vocab.encode(target))]
        whole_text = before + source + after + join + target
        whole = [int(i) for i in getattr(vocab, "encode_as_is", vocab.encode)(whole_text)]
        if assembled == whole:
            return None
        first = next((i for i, (a, b) in enumerate(zip(assembled, whole)) if a != b), min(len(assembled), len(whole)))

        decode = getattr(vocab, "decode_as_is", vocab.decode)

        def show(ids: list[int]) -> str:
            return ", ".join(repr(decode([i])) if i > 1 else str(i) for i in ids[max(first - 2, 0):first + 3])

        return (f"the prompt's pieces, tokenized apart, join differently from the whole text "
                f"{before + source!r}...: [{show(assembled)}] where the whole text has [{show(whole)}]")

    def _texts(self, vocab: Any) -> tuple[str, str]:
        """The template's text before and after `{source}`, filled in (and rendered by the chat template)."""
        before, after = self.template.split("{source}")
        names = {"source_language": self.source_language, "target_language": self.target_language}
        try:
            texts = before.format(**names), after.format(**names)
        except (KeyError, IndexError) as e:
            raise ValueError(f"PromptFormat.template {self.template!r} names an unknown field {e}; it may use "
                             "{source}, {source_language} and {target_language}.") from None
        if self.chat:
            if not hasattr(vocab, "render_chat"):
                raise ValueError("PromptFormat.chat = True needs a Hugging Face tokenizer with a chat template as "
                                 f"the vocabulary, not a {type(vocab).__name__}.")
            # The request with a marker for the source, rendered whole, then cut at the marker: the template may
            # wrap or follow the message with text of its own.
            marker = "\uE000source\uE000"  # a private-use code point: no template or request contains it
            messages = ([{"role": "system", "content": self.system}] if self.system is not None else []) + [
                {"role": "user", "content": texts[0] + marker + texts[1]}]
            rendered = vocab.render_chat(messages)
            if rendered.count(marker) != 1:
                raise ValueError(f"The chat template did not keep the request whole: {rendered!r}.")
            texts = tuple(rendered.split(marker))
        return texts
