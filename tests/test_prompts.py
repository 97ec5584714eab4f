"""Translation as prompt + completion for decoder-only LMs (issue 17): prompts by hand, `TranslationLM` against
the plain LM on each unpadded row, the loss on completions only, and sampling agreeing with training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rest_jax import decoding
from rest_jax import losses
from rest_jax import policy as policy_lib
from rest_jax import tree as tree_lib
from rest_jax.data import prompts
from rest_jax.model import decoder_only
from rest_jax.model import translation_lm


class _CharVocab:
    """Characters as ids: a..z -> 3..28, space 29, ':' 30, newline 31, '.' 32, capitals as their lower case."""

    SPECIAL = {" ": 29, ":": 30, "\n": 31, ".": 32}
    vocab_size = 33

    def encode(self, text):
        return [self.SPECIAL[c] if c in self.SPECIAL else ord(c.lower()) - ord("a") + 3 for c in text
                if c in self.SPECIAL or c.isalpha()]

    def decode(self, ids):
        inverse = {i: c for c, i in self.SPECIAL.items()}
        return "".join(inverse.get(i, chr(i - 3 + ord("a"))) for i in ids)


FORMAT = prompts.PromptFormat(template="{source_language}: {source}\n{target_language}:", source_language="De",
                              target_language="En")
BEFORE, AFTER = (6, 7, 30, 29), (31, 7, 16, 30)  # "De: " and "\nEn:" by hand


def test_prompt_pieces_by_hand():
    assert FORMAT.pieces(_CharVocab()) == (BEFORE, AFTER)
    with pytest.raises(ValueError, match="exactly once"):
        prompts.PromptFormat(template="no source here")
    with pytest.raises(ValueError, match="unknown field"):
        prompts.PromptFormat(template="{language}: {source}").pieces(_CharVocab())


def test_prompts_are_left_padded_pieces_around_the_source_without_eos():
    enc = np.array([[3, 4, 1, 0], [5, 1, 0, 0], [1, 0, 0, 0]], np.int32)
    tokens, mask = translation_lm.prompt_tokens(enc, BEFORE, AFTER, eos_id=1)
    width = 1 + 4 + 3 + 4
    rows = [[0, *BEFORE, 3, 4, *AFTER], [0, *BEFORE, 5, *AFTER], [0, *BEFORE, *AFTER]]
    want = np.array([[0] * (width - len(r)) + r for r in rows])
    np.testing.assert_array_equal(np.asarray(tokens), want)
    np.testing.assert_array_equal(np.asarray(mask), [[False] * (width - len(r)) + [True] * len(r) for r in rows])


@pytest.fixture(scope="module")
def lm():
    config = decoder_only.DecoderOnlyConfig(vocab_size=40, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                            num_layers=2, mlp_dim=64)
    model = translation_lm.TranslationLM(config, prompt_before=BEFORE, prompt_after=AFTER)
    return model, nn.unbox(policy_lib.init_params(model, jax.random.key(0)))


# Sources and targets (ids + EOS), ragged: rows of the batch carry different amounts of padding.
SOURCES = [[3, 4, 1], [5, 6, 7, 8, 9, 1], [10, 1]]
TARGETS = [[11, 12, 1], [13, 1], [14, 15, 16, 17, 1]]


def _batch():
    return {"encoder_input_tokens": decoding.pad_to_bucket(SOURCES, (8,)),
            "decoder_target_tokens": decoding.pad_to_bucket(TARGETS, (8,)),
            "decoder_input_tokens": np.asarray(decoding.shift_right(decoding.pad_to_bucket(TARGETS, (8,)))),
            "decoder_loss_weights": (decoding.pad_to_bucket(TARGETS, (8,)) > 0).astype(np.float32)}


def _alone(model, params, source, target):
    """Reference: log-softmax of the plain LM on the one unpadded row START + before + source + after + target,
    at the positions that predict the target's tokens."""
    prompt = [0, *BEFORE, *source[:-1], *AFTER]
    seq = jnp.asarray([prompt + target[:-1]])
    plain = decoder_only.DecoderOnly(model.config)
    logits = plain.apply({"params": params}, seq, jnp.ones(seq.shape, bool))[0]
    return jax.nn.log_softmax(logits[len(prompt) - 1:], axis=-1)


def test_logits_equal_the_plain_lm_on_each_row_alone(lm):
    model, params = lm
    batch = _batch()
    logits = model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
    assert logits.shape == (3, 8, 40)
    got = jax.nn.log_softmax(logits, axis=-1)
    for r, (source, target) in enumerate(zip(SOURCES, TARGETS)):
        np.testing.assert_allclose(got[r, :len(target)], _alone(model, params, source, target), atol=2e-5)


def test_the_loss_covers_the_completion_only(lm):
    model, params = lm
    loss, aux = losses.make_loss_fn(model, label_smoothing=0.0, z_loss=0.0)(params, _batch(), None)
    nll = 0.0
    for source, target in zip(SOURCES, TARGETS):
        alone = np.asarray(_alone(model, params, source, target))
        nll -= sum(float(alone[j, tok]) for j, tok in enumerate(target))
    count = sum(len(t) for t in TARGETS)
    assert float(aux["num_tokens"]) == count
    np.testing.assert_allclose(float(loss), nll / count, rtol=1e-5)


def test_packed_rows_are_refused(lm):
    model, params = lm
    batch = _batch()
    with pytest.raises(ValueError, match="train.pack = False"):
        model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                    decoder_segment_ids=batch["decoder_target_tokens"] > 0)


def test_sampling_makes_the_prompts_training_scores(lm):
    # Completions sampled through `decoding.sample` (the Grow path), scored back by teacher forcing
    # (`decoding.token_scores`, the training layout): the same per-token log-probs.
    model, params = lm
    enc = decoding.pad_to_bucket(SOURCES, (8,))
    out = decoding.sample(params, model, enc, jax.random.key(1), num_samples=2, max_decode_len=6, temperature=1.3)
    batch = decoding.samples_to_batch(enc, out)
    scored = np.asarray(decoding.token_scores(params, model, batch))
    lengths = np.asarray(out.lengths).reshape(-1)
    sampled = np.asarray(out.token_log_probs).reshape(len(lengths), -1)
    rows = [r for r in range(len(lengths)) if 0 not in np.asarray(batch["decoder_target_tokens"])[r, :lengths[r]]]
    assert len(rows) >= 4  # a sampled pad id is padding in a training batch (a trained LM never emits it)
    for r in rows:
        np.testing.assert_allclose(scored[r, :lengths[r]], sampled[r, :lengths[r]], atol=2e-5)
    with pytest.raises(ValueError, match="encoder-decoder only"):
        decoding.beam_search(params, model, enc)


def test_a_stop_string_ends_sampling_and_the_translation(lm):
    vocab = _CharVocab()
    assert prompts.PromptFormat(stop=".").stop_ids(vocab) == (32,) and FORMAT.stop_ids(vocab) == ()
    assert prompts.PromptFormat(stop="\n").stop_ids(vocab) == (31,)
    # A stop no single token holds stops after its own tokens; one that a token holds needs no sequence.
    assert prompts.PromptFormat(stop="a.").stop_ids(vocab) == () and \
        prompts.PromptFormat(stop="a.").stop_sequences(vocab) == ((3, 32),)
    assert prompts.PromptFormat(stop=".").stop_sequences(vocab) == () == FORMAT.stop_sequences(vocab)
    with pytest.raises(ValueError, match="non-empty"):
        prompts.PromptFormat(stop="")
    # Each sample with stop tokens is the same key's sample without them cut after its first stop token or EOS
    # (the sampler folds the key with the step alone, so the tokens before the stop are the same draws).
    model, params = lm
    stop_ids = (20, 25, 32)
    stopped = model.clone(stop=".", stop_ids=stop_ids)
    enc = decoding.pad_to_bucket(SOURCES, (8,))
    free = decoding.sample(params, model, enc, jax.random.key(2), num_samples=4, max_decode_len=12, temperature=1.5)
    cut = decoding.sample(params, stopped, enc, jax.random.key(2), num_samples=4, max_decode_len=12,
                          temperature=1.5)
    by_stop = 0
    for r in range(len(SOURCES)):
        for j in range(4):
            toks = np.asarray(free.tokens)[r, j, :int(free.lengths[r, j])]
            ends = [k for k, t in enumerate(toks) if t in (1, *stop_ids)]
            n = ends[0] + 1 if ends else len(toks)
            by_stop += bool(ends) and toks[ends[0]] != 1
            assert int(cut.lengths[r, j]) == n
            np.testing.assert_array_equal(np.asarray(cut.tokens)[r, j, :n], toks[:n])
            assert not np.asarray(cut.tokens)[r, j, n:].any()
            np.testing.assert_allclose(np.asarray(cut.token_log_probs)[r, j, :n],
                                       np.asarray(free.token_log_probs)[r, j, :n], atol=1e-6)
            assert policy_lib.finished(stopped, toks[:n]) == bool(ends)
    assert by_stop >= 4  # the stop tokens, not only EOS, ended samples
    # The text ends before the stop; a stop token ends a completion as EOS does, for a policy that has it.
    assert policy_lib.detokenize(vocab, [3, 4, 32, 5, 1], stop=".") == "ab"
    assert policy_lib.detokenize(vocab, [3, 4, 32, 5, 1]) == "ab.c"
    assert policy_lib.finished(stopped, [3, 32]) and policy_lib.finished(model, [3, 1])
    assert not policy_lib.finished(model, [3, 32]) and not policy_lib.finished(stopped, [3, 4])
    gens = policy_lib.Policy(stopped, params, vocab).generate(["ab", "cde"], method="sample", num_samples=3,
                                                              max_decode_length=12, temperature=1.5, seed=3,
                                                              batch_size=2)
    for texts, tokens in zip(gens.texts, gens.tokens):
        assert texts == [policy_lib.detokenize(vocab, t, ".") for t in tokens] and not any("." in t for t in texts)


def test_a_stop_of_several_tokens_ends_sampling_after_its_last_token(lm):
    """Samples with a two-token stop sequence are the same key's unstopped samples cut after the first place
    they hold it (or EOS), found by brute force; `finished` counts a completion that ends with it."""
    model, params = lm
    enc = decoding.pad_to_bucket(SOURCES, (8,))
    free = decoding.sample(params, model, enc, jax.random.key(4), num_samples=6, max_decode_len=12, temperature=2.0)
    rows = [list(np.asarray(free.tokens)[r, j, :int(free.lengths[r, j])]) for r in range(len(SOURCES)) for j in range(6)]
    pairs = [tuple(int(x) for x in row[k:k + 2]) for row in rows for k in range(len(row) - 1) if 1 not in row[k:k + 2]]
    seq = max(set(pairs), key=pairs.count)  # the commonest bigram, so that several samples hold it
    stopped = model.clone(stop="?", stop_sequences=(seq,))
    cut = decoding.sample(params, stopped, enc, jax.random.key(4), num_samples=6, max_decode_len=12,
                          temperature=2.0)
    by_seq = 0
    for i, row in enumerate(rows):
        r, j = divmod(i, 6)
        hits = [k + 2 for k in range(len(row) - 1) if tuple(row[k:k + 2]) == seq]
        n = min(hits + [len(row)])
        by_seq += bool(hits)
        assert int(cut.lengths[r, j]) == n, (row, seq)
        np.testing.assert_array_equal(np.asarray(cut.tokens)[r, j, :n], row[:n])
        assert not np.asarray(cut.tokens)[r, j, n:].any()
        assert policy_lib.finished(stopped, row[:n]) == (bool(hits) or row[-1] == 1 and n == len(row))
    assert by_seq >= 2
    assert policy_lib.finished(stopped, [5, *seq]) and not policy_lib.finished(model, [5, *seq])


def test_value_network_is_a_head_on_the_plain_lm_states_of_each_row(lm):
    # The decoder-only value network (PPO, OAC, BVMPO): the policy's trunk + a head, V(x, y_<t) read from the
    # plain LM's final states of each unpadded row, in float64 by hand.
    from rest_jax.model import heads  # pylint: disable=import-outside-toplevel

    model, params = lm
    value_model = heads.build_value_network(model)
    assert isinstance(value_model, heads.LMValueNetwork)
    assert (value_model.prompt_before, value_model.prompt_after) == (BEFORE, AFTER)
    fresh = nn.unbox(heads.init_params(value_model, jax.random.key(3)))
    value_params = heads.transplant_trunk(params, fresh)
    flat = lambda tree: set(tree_lib.flatten(tree))  # noqa: E731
    assert flat(value_params) - flat(params) == {"value_head/kernel", "value_head/bias"}
    assert flat(params) - flat(value_params) <= {"decoder/logits_dense/kernel"}
    batch = _batch()
    values = np.asarray(value_model.apply({"params": value_params}, batch["encoder_input_tokens"],
                                          batch["decoder_input_tokens"]))
    assert values.shape == (3, 8)
    plain = decoder_only.DecoderOnly(model.config)
    kernel = np.asarray(value_params["value_head"]["kernel"], np.float64)[:, 0]
    bias = float(value_params["value_head"]["bias"][0])
    for r, (source, target) in enumerate(zip(SOURCES, TARGETS)):
        prompt = [0, *BEFORE, *source[:-1], *AFTER]
        seq = jnp.asarray([prompt + target[:-1]])
        states = plain.apply({"params": params}, seq, jnp.ones(seq.shape, bool), None, None, True,
                             method=decoder_only.DecoderOnly._forward)[0][0]
        want = 1 / (1 + np.exp(-(np.asarray(states, np.float64)[len(prompt) - 1:] @ kernel + bias)))
        np.testing.assert_allclose(values[r, :len(target)], want, atol=2e-5)
    with pytest.raises(ValueError, match="policy is decoder-only"):
        heads.build_value_network(model, config=heads.T5Config())


def test_build_network_follows_gin():
    import gin  # pylint: disable=import-outside-toplevel

    from rest_jax import gin_utils  # pylint: disable=import-outside-toplevel
    from rest_jax.model import heads  # pylint: disable=import-outside-toplevel
    from rest_jax.model import t5  # pylint: disable=import-outside-toplevel

    try:
        gin_utils.parse(["models/decoder_only/tiny.gin"], [gin_utils.Binding(text, "test") for text in (
            "PromptFormat.template = '{source_language}: {source}\\n{target_language}:'",
            "PromptFormat.source_language = 'De'", "PromptFormat.target_language = 'En'",
            "PromptFormat.stop = '.'")])
        model = policy_lib.build_network(_CharVocab())
        assert isinstance(model, translation_lm.TranslationLM) and model.config.num_kv_heads == 2
        assert (model.prompt_before, model.prompt_after) == (BEFORE, AFTER)
        assert (model.stop, model.stop_ids) == (".", (32,))
        with pytest.raises(ValueError, match="needs its vocabulary"):
            policy_lib.build_network()
        assert isinstance(heads.build_value_network(model), heads.LMValueNetwork)
        gin.clear_config()
        gin_utils.parse(["models/tiny.gin"], [gin_utils.Binding("build_network.architecture = 'decoder-only'", "test")])
        with pytest.raises(ValueError, match="one of .'encoder_decoder', 'decoder_only'"):
            policy_lib.build_network(_CharVocab())
        gin.clear_config()
        gin_utils.parse(["models/tiny.gin"], [])
        assert isinstance(policy_lib.build_network(), t5.Transformer)
    finally:
        gin.clear_config()


@pytest.mark.parametrize("mesh_shape", [(2, 4)])
def test_sharded_train_steps_match_one_device(lm, mesh_shape):
    # Three AdamW steps of BC on a decoder-only policy: 8 simulated devices (data x model) against one device.
    from rest_jax import optim  # pylint: disable=import-outside-toplevel
    from rest_jax import partitioning  # pylint: disable=import-outside-toplevel
    from rest_jax import trainer  # pylint: disable=import-outside-toplevel
    from rest_jax import tree as tree_lib  # pylint: disable=import-outside-toplevel

    model, _ = lm
    base = _batch()
    batch = {k: np.concatenate([v] * 8, axis=0)[:8] for k, v in base.items()}  # 8 rows: one per data shard
    rules = partitioning.standard_logical_axis_rules()
    results = []
    for mesh in (partitioning.create_mesh((1, 1), devices=jax.devices()[:1]), partitioning.create_mesh(mesh_shape)):
        opt = optim.create_optimizer(lambda learning_rate: optim.adamw(learning_rate),
                                     schedule=optim.learning_rate_schedule("constant", 1e-2, 0))
        state, shardings = trainer.init_train_state(model, opt, jax.random.key(0), mesh, rules)
        step = trainer.make_train_step(opt, losses.make_loss_fn(model), mesh=mesh, rules=rules,
                                       state_shardings=shardings)
        losses_seen = []
        for _ in range(3):
            state, metrics = step(state, partitioning.shard_batch(batch, mesh, rules))
            losses_seen.append(float(metrics["loss"]))
        results.append((losses_seen, tree_lib.flatten(jax.device_get(state.params))))
    (ref_losses, ref_params), (losses_seen, params) = results
    np.testing.assert_allclose(losses_seen, ref_losses, rtol=1e-5)
    assert ref_losses[-1] < ref_losses[0]
    for name, value in ref_params.items():
        np.testing.assert_allclose(params[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
