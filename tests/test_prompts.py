"""Translation as prompt + completion for decoder-only LMs (issue 17): batches by hand, the loss on completions
only, and training's layout agreeing with sampling's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rest_jax import decoding
from rest_jax import losses
from rest_jax import policy as policy_lib
from rest_jax.data import prompts
from rest_jax.model import decoder_only


class _CharVocab:
    """Characters as ids: a..z -> 3..28, space 29, ':' 30, newline 31, '.' 32, capitals as their lower case."""

    SPECIAL = {" ": 29, ":": 30, "\n": 31, ".": 32}

    def encode(self, text):
        return [self.SPECIAL[c] if c in self.SPECIAL else ord(c.lower()) - ord("a") + 3 for c in text
                if c in self.SPECIAL or c.isalpha()]


FORMAT = prompts.PromptFormat(template="{source_language}: {source}\n{target_language}:", source_language="De",
                              target_language="En")


def test_lm_batch_by_hand():
    vocab = _CharVocab()
    p, c = prompts.encode_pairs(vocab, ["ab"], ["c"], FORMAT, 32, 8)
    assert p == [[6, 7, 30, 29, 3, 4, 31, 7, 16, 30]]  # "De: ab\nEn:"
    assert c == [[5, 1]]  # "c" + EOS
    batch = prompts.lm_batch(p, c, 14)
    np.testing.assert_array_equal(batch["decoder_target_tokens"][0], p[0] + c[0] + [0, 0])
    np.testing.assert_array_equal(batch["decoder_input_tokens"][0], [0] + p[0] + c[0] + [0])
    np.testing.assert_array_equal(batch["decoder_loss_weights"][0], [0] * 10 + [1, 1, 0, 0])
    with pytest.raises(ValueError, match="exceed length 11"):
        prompts.lm_batch(p, c, 11)


def test_long_sources_lose_their_middle_not_the_cue():
    vocab = _CharVocab()
    (p,), _ = prompts.encode_pairs(vocab, ["abcdefghij"], None, FORMAT, 12, 8)
    assert len(p) == 12 and p[:4] == [6, 7, 30, 29] and p[-4:] == [31, 7, 16, 30]  # "De: " ... "\nEn:"
    with pytest.raises(ValueError, match="does not fit the prompt format"):
        prompts.encode_pairs(vocab, ["abc"], None, FORMAT, 8, 8)


@pytest.fixture(scope="module")
def lm():
    config = decoder_only.DecoderOnlyConfig(vocab_size=40, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                            num_layers=2, mlp_dim=64)
    model = decoder_only.DecoderOnly(config)
    return model, nn.unbox(decoder_only.init_params(model, jax.random.key(0)))


def test_the_loss_covers_the_completion_only(lm):
    # Reference: each pair alone, start token + prompt + completion, the completion's mean NLL by hand.
    model, params = lm
    vocab = _CharVocab()
    p, c = prompts.encode_pairs(vocab, ["ab", "hello there"], ["c", "zz y"], FORMAT, 32, 8)
    batch = {k: jnp.asarray(v) for k, v in prompts.lm_batch(p, c, 24).items()}
    loss, aux = policy_lib.make_loss_fn(model, label_smoothing=0.0, z_loss=0.0)(params, batch, None)
    nll, count = 0.0, 0
    for prompt, completion in zip(p, c):
        seq = jnp.asarray([[0, *prompt, *completion]])
        logp = jax.nn.log_softmax(model.apply({"params": params}, seq, jnp.ones(seq.shape, bool))[0], axis=-1)
        for j, token in enumerate(completion):
            nll -= float(logp[len(prompt) + j, token])  # position len(prompt)+j holds the token before it
            count += 1
    assert float(aux["num_tokens"]) == count
    np.testing.assert_allclose(float(loss), nll / count, rtol=1e-5)


def test_sampling_layout_matches_training_layout(lm):
    # Completions sampled from `prompt_batch` rows, scored back through `lm_batch` rows: the same log-probs.
    model, params = lm
    vocab = _CharVocab()
    p, _ = prompts.encode_pairs(vocab, ["ab", "hello there", "x"], None, FORMAT, 32, 8)
    tokens, mask = prompts.prompt_batch(p)
    out = decoding.sample_lm(params, model, tokens, mask, jax.random.key(1), num_samples=2, max_decode_len=6)
    toks, lengths, lps = (np.asarray(x) for x in (out.tokens, out.lengths, out.token_log_probs))
    rows_p = [p[i] for i in range(3) for _ in range(2)]
    rows_c = [list(toks[i, j, :lengths[i, j]]) for i in range(3) for j in range(2)]
    batch = {k: jnp.asarray(v) for k, v in prompts.lm_batch(rows_p, rows_c, 28).items()}
    logits = policy_lib.teacher_forced_logits(model, params, batch)
    scored = np.asarray(losses.token_log_probs(logits, batch["decoder_target_tokens"]))
    checked = 0
    for r, (prompt, completion) in enumerate(zip(rows_p, rows_c)):
        if 0 in completion:  # a sampled pad id is padding in a training batch (a trained LM never emits it)
            continue
        checked += 1
        np.testing.assert_allclose(scored[r, len(prompt):len(prompt) + len(completion)],
                                   lps[r // 2, r % 2, :len(completion)], atol=2e-5)
    assert checked >= 4
