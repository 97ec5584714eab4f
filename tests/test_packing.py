"""Packed training rows (several examples per row, seqio's packing converter) give the unpacked result.

The unpacked forward pass is checked against HF T5 in test_convert_hf.py; here a packed batch must give, for
every example it holds, the same per-token logits and the same summed loss as that example alone.
"""

import functools

import numpy as np
import pytest
import seqio
import tensorflow as tf

import jax
import jax.numpy as jnp

from rest_jax import improve, improve_data, losses, trainer
from rest_jax.model import t5

CONFIG = t5.T5Config(vocab_size=50, emb_dim=32, num_heads=2, num_encoder_layers=2, num_decoder_layers=2,
                     head_dim=16, mlp_dim=48, dropout_rate=0.0,
                     # Small buckets so relative positions inside a segment span several of them.
                     relative_attention_num_buckets=8, relative_attention_max_distance=12)
LENGTHS = {"inputs": 24, "targets": 24}


def _examples(num=9, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        src = rng.integers(2, CONFIG.vocab_size, size=rng.integers(2, 9)).tolist() + [1]
        tgt = rng.integers(2, CONFIG.vocab_size, size=rng.integers(2, 9)).tolist() + [1]
        out.append({"inputs": np.array(src, np.int32), "targets": np.array(tgt, np.int32)})
    return out


def _converted(examples, pack):
    ds = tf.data.Dataset.from_generator(
        lambda: iter(examples),
        output_signature={"inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32)})
    ds = seqio.EncDecFeatureConverter(pack=pack)(ds, LENGTHS)
    rows = list(ds.as_numpy_iterator())
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.fixture(scope="module")
def model_and_params():
    model = t5.Transformer(CONFIG)
    return model, jax.tree.map(jnp.asarray, t5.init_params(model, jax.random.key(3)))


def test_packed_logits_equal_each_example_alone(model_and_params):
    model, params = model_and_params
    examples = _examples()
    packed = _converted(examples, pack=True)
    assert packed["encoder_input_tokens"].shape[0] < len(examples)  # really packed
    assert packed["decoder_segment_ids"].max() >= 3
    logits = np.asarray(model.apply({"params": params}, packed["encoder_input_tokens"],
                                    packed["decoder_input_tokens"],
                                    encoder_segment_ids=packed["encoder_segment_ids"],
                                    decoder_segment_ids=packed["decoder_segment_ids"]))
    checked = 0
    for row in range(packed["decoder_segment_ids"].shape[0]):
        seg = packed["decoder_segment_ids"][row]
        for s in range(1, seg.max() + 1):
            tgt = packed["decoder_target_tokens"][row][seg == s]
            src = packed["encoder_input_tokens"][row][packed["encoder_segment_ids"][row] == s]
            # Every example appears once, in order: find it by its tokens.
            (ex,) = [e for e in examples if np.array_equal(e["targets"], tgt) and np.array_equal(e["inputs"], src)]
            dec_in = np.concatenate([[0], ex["targets"][:-1]])[None]
            alone = np.asarray(model.apply({"params": params}, ex["inputs"][None], dec_in))[0]
            np.testing.assert_allclose(logits[row][seg == s], alone, atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked == len(examples)


def test_packed_loss_sum_equals_unpacked(model_and_params):
    model, params = model_and_params
    examples = _examples(num=12, seed=1)
    loss_fn = losses.make_loss_fn(model, label_smoothing=0.1, z_loss=1e-4)
    totals = {}
    for pack in (False, True):
        batch = _converted(examples, pack=pack)
        batch["decoder_loss_weights"] = batch["decoder_loss_weights"].astype(np.float32)
        batch = trainer.token_features(batch)
        assert ("decoder_segment_ids" in batch) == pack
        loss, aux = loss_fn(params, batch, None)
        totals[pack] = (float(loss) * float(aux["num_tokens"]), float(aux["num_tokens"]))
    assert totals[True][1] == totals[False][1] == sum(len(e["targets"]) for e in examples)
    np.testing.assert_allclose(totals[True][0], totals[False][0], rtol=1e-5)


def _grow_items(examples):
    """`improve_data.TRAIN_COLUMNS` items of the examples, reward 0.5."""
    return [(e["inputs"], e["targets"], 0.5) for e in examples]


def _segments(rows):
    """Every (source, target) segment of packed rows, checking each row's layout against its segment ids."""
    out = []
    for row in rows:
        enc, dec = row["encoder_segment_ids"], row["decoder_segment_ids"]
        for ids, tokens in ((enc, row["encoder_input_tokens"]), (dec, row["decoder_target_tokens"])):
            assert np.array_equal(ids > 0, tokens > 0) and np.all(np.diff(ids[ids > 0]) >= 0)  # contiguous
        for s in range(1, dec.max() + 1):
            tgt = row["decoder_target_tokens"][dec == s]
            np.testing.assert_array_equal(row["decoder_input_tokens"][dec == s], np.concatenate([[0], tgt[:-1]]))
            out.append((tuple(row["encoder_input_tokens"][enc == s]), tuple(tgt)))
    return out


def test_improve_packing_is_seqios_packing_and_first_fit_fills_rows_fuller():
    """improve_step.pack with one open row packs Grow rows exactly as seqio packs BC's rows (the reference),
    overlong rows trimmed to EOS; with the default open rows (first fit) the same examples take fewer rows."""
    # seqio packs windows of max(lengths) = 24 examples, each ending in a partial row: one window here.
    examples = _examples(num=24, seed=2)
    examples[3]["targets"] = np.arange(2, 32, dtype=np.int32)  # overlong: trimmed to 23 tokens + EOS, as seqio
    trimmed = [{"inputs": e["inputs"], "targets": improve_data._trimmed(e["targets"], LENGTHS["targets"])}
               for e in examples]  # pylint: disable=protected-access
    assert len(trimmed[3]["targets"]) == 24 and trimmed[3]["targets"][-1] == 1
    want = _converted(trimmed, pack=True)
    greedy = list(improve_data.packed_rows(iter(_grow_items(examples)), LENGTHS, open_rows=1))
    assert len(greedy) == len(want["encoder_input_tokens"]) < len(examples)
    for key in ("encoder_input_tokens", "encoder_segment_ids", "decoder_input_tokens", "decoder_target_tokens",
                "decoder_segment_ids", "decoder_loss_weights"):
        np.testing.assert_array_equal(np.stack([row[key] for row in greedy]), want[key], err_msg=key)
    first_fit = list(improve_data.packed_rows(iter(_grow_items(examples)), LENGTHS))
    assert len(first_fit) < len(greedy)
    assert sorted(_segments(first_fit)) == sorted(_segments(greedy)) == \
        sorted((tuple(e["inputs"]), tuple(e["targets"])) for e in trimmed)


@pytest.mark.parametrize("loss_name, weighting", [("bc", None), ("rwbc", "normalized"), ("rwbc", "exp"),
                                                   ("rwbc", "raw")])
def test_improve_loss_on_packed_grow_rows_equals_unpacked(model_and_params, loss_name, weighting):
    """The per-token Improve losses of packed rows: the same token sum and count as one example per row (rwbc:
    each example's weight from its reward, normalised over examples, as unpacked)."""
    model, params = model_and_params
    rewards = np.random.default_rng(5).uniform(size=12)
    items = [(src, tgt, r) for (src, tgt, _), r in zip(_grow_items(_examples(num=12, seed=4)), rewards)]
    loss = losses.get_loss(loss_name)
    if weighting is not None:
        loss = functools.partial(loss, weighting=weighting, beta=0.3)
    loss_fn = improve.make_improve_loss_fn(model, loss)
    totals = {}
    for pack in (False, True):
        if pack:
            rows = list(improve_data.packed_rows(iter(items), LENGTHS))
            batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            assert len(rows) < len(items)
        else:
            batch = improve_data.make_batch({c: [it[i] for it in items] for i, c in
                                             enumerate(improve_data.TRAIN_COLUMNS)}, LENGTHS)
        loss, aux = loss_fn(params, batch, None)
        totals[pack] = (float(loss) * float(aux["num_tokens"]), float(aux["num_tokens"]))
    assert totals[True][1] == totals[False][1] == sum(len(it[1]) for it in items)
    np.testing.assert_allclose(totals[True][0], totals[False][0], rtol=1e-5)


def test_one_segment_id_without_the_other_is_an_error(model_and_params):
    model, params = model_and_params
    tokens = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="both encoder_segment_ids and decoder_segment_ids"):
        model.apply({"params": params}, tokens, tokens, encoder_segment_ids=tokens)


def test_packed_training_batches_hold_more_target_tokens(multi30k_dir, tmp_path):
    import gin

    from rest_jax.data import pipeline, text_files, vocab

    lines = list(text_files.read_lines(str(multi30k_dir / "train.de")))[:2000]
    lines += list(text_files.read_lines(str(multi30k_dir / "train.en")))[:2000]
    vocab_path = vocab.train_vocabulary(lines, str(tmp_path), vocab_size=256)
    gin.clear_config()
    gin.parse_config([f"multi30k_source.data_dir = '{multi30k_dir}'", f"get_task.vocabulary = '{vocab_path}'"])
    try:
        tokens = {}
        for pack in (False, True):
            # A 256-piece vocabulary makes sentences ~35 pieces long: rows of 96 hold two or three.
            batches = pipeline.get_batches("multi30k_de_en", "train", batch_size=32,
                                           feature_lengths={"inputs": 96, "targets": 96}, seed=0, shard_index=0,
                                           num_shards=1, pack=pack)
            batch = next(batches)
            assert batch["decoder_target_tokens"].shape == (32, 96)
            assert ("decoder_segment_ids" in batch) == pack
            tokens[pack] = float(batch["decoder_loss_weights"].sum())
    finally:
        gin.clear_config()
    assert tokens[True] > 1.5 * tokens[False], tokens
