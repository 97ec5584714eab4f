"""A decoder-only LM as a translation policy π(y | x), called like the encoder-decoder (issue 17).

ReST (Gulcehre et al. 2023, Sec. 2) needs p(y | x) from its policy, not an encoder. `TranslationLM` is
`DecoderOnly` (the same parameters under T5X's decoder-only names) with the call signature of
`t5.Transformer`: `apply(params, encoder_input_tokens, decoder_input_tokens)` returns the logits of the
targets [b, T, vocab]. Inside the call each source (ids, EOS, 0 padding) becomes a prompt: the decoder start
token, the template's tokens before the source, the source without its EOS and the template's tokens after it
(`rest_jax.data.prompts.PromptFormat.pieces`), left-padded so that every prompt ends at the same column and
the completions (target + EOS) occupy the same columns in every row. Every batch, loss, Grow store, filter and
value of the encoder-decoder therefore serves this family unchanged; the sampler
(`decoding.sample` → `decoding.sample_lm`) builds the same prompts, so training and sampling agree token for
token and position for position (rotary positions count real tokens only).

Packed rows (segment ids) are not supported: decoder-only BC trains unpacked.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from rest_jax.model.decoder_only import DecoderOnly

Array = jax.Array

START_ID = 0  # T5X's decoder start token; it opens every prompt (and is real there: masked True)


def prompt_tokens(encoder_input_tokens: Array, before: Sequence[int], after: Sequence[int],
                  eos_id: int, start_id: int = START_ID) -> tuple[Array, Array]:
    """Left-padded prompts [b, W] and their mask (True on real tokens) from 0-padded sources [b, s].

    Row r is `[0 ... 0, start_id, *before, *source_r, *after]` with `source_r` its tokens other than `eos_id` (the
    prompt has no EOS of its own); W = 1 + len(before) + s - 1 + len(after), the widest a source of s ids (EOS
    included) can make.
    """
    source = jnp.asarray(encoder_input_tokens).astype(jnp.int32)
    width = source.shape[1]
    head = jnp.asarray([start_id, *before], jnp.int32)
    tail = jnp.asarray([*after, 0], jnp.int32)  # a 0 past the end keeps the gathers below in range
    h, a = head.shape[0], len(after)
    total = h + max(width - 1, 0) + a
    n = jnp.sum((source > 0) & (source != eos_id), axis=1)[:, None]  # [b, 1] source tokens before EOS
    i = jnp.arange(total)[None, :] - (total - (h + n + a))  # index into the row's own (unpadded) prompt
    from_head = head[jnp.clip(i, 0, h - 1)]
    from_source = jnp.take_along_axis(source, jnp.clip(i - h, 0, max(width - 1, 0)), axis=1)
    from_tail = tail[jnp.clip(i - h - n, 0, a)]
    tokens = jnp.where(i < h, from_head, jnp.where(i < h + n, from_source, from_tail))
    mask = i >= 0
    return jnp.where(mask, tokens, 0), mask


class TranslationLM(DecoderOnly):
    """`DecoderOnly` behind the encoder-decoder's call: the logits of the targets given the sources.

    Attributes:
      prompt_before: Token ids of the prompt template before the source (`PromptFormat.pieces`).
      prompt_after: Token ids after it (the cue the completion follows, e.g. "English:").
      eos_id: The vocabulary's end of sequence, which closes sources and completions.
      start_id: The prompt's first token: the decoder start 0, or a pre-trained LM's BOS.
      stop: Text that also ends a completion (`PromptFormat.stop`; None: EOS alone), `stop_ids` the tokens
        that hold it and `stop_sequences` its encodings of several tokens: the sampler stops at them, the
        translation's text ends before the stop.
    """

    prompt_before: tuple[int, ...] = ()
    prompt_after: tuple[int, ...] = ()
    eos_id: int = 1
    start_id: int = START_ID
    stop: str | None = None
    stop_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()

    def prompts(self, encoder_input_tokens: Array) -> tuple[Array, Array]:
        """(tokens, mask) [b, W] of the sources' prompts, as `prompt_tokens` builds them."""
        return prompt_tokens(encoder_input_tokens, self.prompt_before, self.prompt_after, self.eos_id, self.start_id)

    def completion_states(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                          enable_dropout: bool = False) -> Array:
        """Final (normed) hidden states [b, T, emb_dim]: column t is the state that predicts target t.

        Column 0 is the prompt's last token; column t > 0 has read the targets before t. A value network on
        this trunk (`heads.LMValueNetwork`) reads the same states the policy's logits come from.
        """
        prompt, prompt_mask = self.prompts(encoder_input_tokens)
        completion = jnp.asarray(decoder_input_tokens)[:, 1:]  # after the start token: the targets but the last
        tokens = jnp.concatenate([prompt, completion.astype(jnp.int32)], axis=1)
        mask = jnp.concatenate([prompt_mask, completion > 0], axis=1)
        y, _ = self._forward(tokens, mask, None, None, not enable_dropout)
        return y[:, prompt.shape[1] - 1:]

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 encoder_segment_ids: Array | None = None, decoder_segment_ids: Array | None = None,
                 enable_dropout: bool = False) -> Array:
        """Logits [b, T, vocab] (float32) of the targets whose shifted-right inputs are `decoder_input_tokens`.

        The vocabulary projection runs on the completion's columns only (the prompt's next-token predictions
        are not needed by any loss).
        """
        if encoder_segment_ids is not None or decoder_segment_ids is not None:
            raise ValueError("A decoder-only translation policy takes unpacked rows (no segment ids): set "
                             "train.pack = False.")
        return self._logits(self.completion_states(encoder_input_tokens, decoder_input_tokens, enable_dropout))
