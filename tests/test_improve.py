"""Improve's data path (ReST Sec. 3): per-shard filtering, streamed batches, P-invariant order, bounded reads.

References: the streamed filter is checked against `filters.apply_filters` on the whole dataset at once (the
pre-streaming semantics); the multi-host batches against the one-host batches; batch layout by hand.
"""

import contextlib
import logging

import gin
import numpy as np
import pytest

from rest_jax import filters, improve_data
from rest_jax.data import grow_store

LENGTHS = {"inputs": 8, "targets": 8}
PACKED_LENGTHS = {"inputs": 16, "targets": 16}  # rows of up to three of the store's examples


def _records(num_sources=12, n=4, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(num_sources):
        for j in [-1] + list(range(n)):
            length = int(rng.integers(2, 7))
            # Every third source repeats a sample (the duplicate check is per source); references score 1.
            text = f"cand {s} {min(j, 1) if s % 3 == 0 else j} " + "x" * 3
            rows.append(dict(
                source_id=s, sample_id=j, is_reference=j == -1, reward=1.0 if j < 0 else float(rng.uniform()),
                source_text=f"source {s}", candidate_text=text, reference_text=f"ref {s}",
                source_tokens=[int(t) for t in rng.integers(3, 50, size=4)] + [1],
                candidate_tokens=[int(t) for t in rng.integers(3, 50, size=length)] + [1],
                behaviour_logprobs=[float(x) for x in -rng.uniform(size=length + 1)]))
    return rows


def _write_store(path, records, sources_per_shard=3, grow_index=1):
    sources = sorted({r["source_id"] for r in records})
    n = sum(r["source_id"] == sources[0] for r in records) - 1
    writer = grow_store.GrowStoreWriter(str(path), grow_index, sources, n, sources_per_shard=sources_per_shard)
    for shard in range(writer.num_shards):
        ids = set(writer.shard_source_ids(shard))
        writer.write_shard(shard, [r for r in records if r["source_id"] in ids])
    writer.write_metadata()
    return str(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _write_store(tmp_path_factory.mktemp("grow") / "store", _records())  # 12 sources: 4 shards


def _whole(path, include_references, **kwargs):
    """The reference: the whole store in memory, filtered at once."""
    cols = grow_store.GrowStore(path).as_numpy()
    keep = np.ones(len(cols["reward"]), bool) if include_references else ~cols["is_reference"]
    cols = {k: v[keep] for k, v in cols.items()}
    result = filters.apply_filters(cols["reward"], cols["source_id"], 1, sources=list(cols["source_text"]),
                                   candidates=list(cols["candidate_text"]), references=list(cols["reference_text"]),
                                   is_reference=cols["is_reference"].astype(bool), **kwargs)
    return cols, result


@pytest.mark.parametrize("method, max_per_source, include_references", [
    ("threshold", None, True), ("percentile", None, True), ("top_k", 2, False), ("gamma", None, False)])
def test_per_shard_filter_keeps_what_the_whole_dataset_filter_keeps(store, method, max_per_source,
                                                                     include_references):
    data = improve_data.GrowData.open(store)
    selection = improve_data.Selection(1, include_references, method, max_per_source)
    counts = improve_data.filter_counts(data, selection)
    cols, want = _whole(store, include_references, method=method, max_per_source=max_per_source)
    assert counts.filter.summary() == want.summary()
    assert counts.num_kept == want.num_kept > 0
    kept = []
    for unit in range(data.num_units):
        unit_cols = data.read(unit, ("source_id", "sample_id") + improve_data.FILTER_COLUMNS)
        rows, _ = selection.apply(unit_cols)
        kept += list(zip(unit_cols["source_id"][rows], unit_cols["sample_id"][rows]))
    sample_ids = grow_store.GrowStore(store).as_numpy(["sample_id", "is_reference"])
    keep = np.ones(len(sample_ids["sample_id"]), bool) if include_references else ~sample_ids["is_reference"]
    expected = list(zip(cols["source_id"][want.mask], sample_ids["sample_id"][keep][want.mask]))
    assert sorted(kept) == sorted(expected)


def test_first_threshold_check_uses_the_mean_sample_reward_of_all_shards(store, caplog):
    samples = grow_store.GrowStore(store).as_numpy(["reward", "is_reference"])
    mean = float(np.mean(samples["reward"][~samples["is_reference"]].astype(np.float64)))
    data = improve_data.GrowData.open(store)
    with caplog.at_level(logging.WARNING):
        counts = improve_data.filter_counts(data, improve_data.Selection(1, True, "threshold"))
    assert counts.mean_sample_reward == pytest.approx(mean)
    # Default τ_1 = 0.7 is above the samples' mean (~0.5) but not above the mean counting references: no warning.
    assert "not above the mean" not in caplog.text
    with bound("threshold_for_step.schedule", (0.0, 0.3)), caplog.at_level(logging.WARNING):
        improve_data.filter_counts(data, improve_data.Selection(1, True, "threshold"))
    assert f"mean Grow reward {mean:.4g}" in caplog.text


@contextlib.contextmanager
def bound(name, value):
    """A gin binding for the duration of a block."""
    gin.bind_parameter(name, value)
    try:
        yield
    finally:
        gin.clear_config()


def _stream(data, selection, batch_size, seed, shard=(0, 1), lengths=None, **kw):
    counts = improve_data.filter_counts(data, selection, kw.get("pairing"))
    return improve_data.stream_batches(data, selection, counts, batch_size, lengths or LENGTHS, seed, shard, **kw)


def _rows(batch):
    """Rows of a batch as hashable (reward, targets) keys."""
    return [(float(r), tuple(t)) for r, t in zip(batch["reward"], batch["decoder_target_tokens"])]


@pytest.mark.parametrize("num_readers, pack", [(8, False), (2, False), (2, True)])
def test_hosts_blocks_stack_to_the_one_host_batches(store, num_readers, pack):
    """P-invariance: process i's block of each batch, stacked over i, is the one-process batch (packed too)."""
    data = improve_data.GrowData.open(store)
    selection = improve_data.Selection(1, True, "threshold")
    kw = dict(seed=3, num_readers=num_readers, shuffle_buffer=5, pack=pack, lengths=PACKED_LENGTHS if pack else None)
    one = _stream(data, selection, 8, **kw)
    hosts = [_stream(data, selection, 8, shard=(i, 2), **kw) for i in range(2)]
    for _ in range(12):
        want, parts = next(one), [next(h) for h in hosts]
        assert ("decoder_segment_ids" in want) == pack and (not pack or want["decoder_segment_ids"].max() >= 2)
        for key in want:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
    with pytest.raises(ValueError, match="batch size 8 is not divisible by the 3 data shards"):
        next(_stream(data, selection, 8, seed=3, shard=(0, 3)))


def test_stream_visits_exactly_the_kept_rows_evenly(store):
    data = improve_data.GrowData.open(store)
    selection = improve_data.Selection(1, False, "threshold")
    cols, want = _whole(store, False, method="threshold")
    expected = {(float(np.float32(r)), tuple(t[:8])) for r, t in
                zip(cols["reward"][want.mask], cols["candidate_tokens"][want.mask])}
    stream = _stream(data, selection, 4, seed=0, num_readers=4, shuffle_buffer=3)
    seen = [row for _ in range(100 * len(expected) // 4) for row in _rows(next(stream))]
    keys = [(r, tuple(int(x) for x in t if x)) for r, t in seen]
    assert set(keys) == expected
    freq = np.array([keys.count(k) for k in expected])
    assert freq.min() > 0.5 * freq.mean(), freq  # readers balanced by kept rows: no row starved
    def first(seed=0, num_readers=4, shuffle_buffer=3):
        stream = _stream(data, selection, 4, seed=seed, num_readers=num_readers, shuffle_buffer=shuffle_buffer)
        return [row for _ in range(3) for row in _rows(next(stream))]

    # The seed and both knobs change the order (documented knobs must change what runs); a rerun does not.
    assert first() == first()
    assert first() != first(seed=1) and first() != first(num_readers=2) and first() != first(shuffle_buffer=50)


def test_packed_stream_packs_each_readers_rows_in_their_order(store):
    """Packed batches are `packed_rows` of the unpacked stream of the same seed (a reader's rows, in its order):
    a batch takes whole packed rows from every reader in turn, as it takes rows."""
    data = improve_data.GrowData.open(store)
    selection = improve_data.Selection(1, False, "threshold")
    one_reader = dict(seed=5, num_readers=1, shuffle_buffer=4, lengths=PACKED_LENGTHS)
    plain, packed = _stream(data, selection, 4, **one_reader), _stream(data, selection, 2, pack=True, **one_reader)
    items = ((src[src > 0], tgt[tgt > 0], r) for batch in iter(lambda: next(plain), None)
             for src, tgt, r in zip(batch["encoder_input_tokens"], batch["decoder_target_tokens"], batch["reward"]))
    want = improve_data.packed_rows(items, PACKED_LENGTHS)
    for _ in range(10):
        batch = next(packed)
        assert batch["decoder_segment_ids"].max() >= 2
        for r in range(2):
            row = next(want)
            for key, value in row.items():
                np.testing.assert_array_equal(batch[key][r], value, err_msg=key)
    with pytest.raises(ValueError, match="preference pairs .* cannot be packed"):
        next(_stream(data, selection, 4, seed=0, pack=True, pairing=improve_data.Pairing()))


def test_readers_own_whole_shards_and_read_each_once_per_epoch(store):
    """With at least as many shards as readers, a reader reads only its own shards (one host reads its share)."""
    reads = []
    base = improve_data.GrowData.open(store)
    data = improve_data.GrowData(lambda u, c: reads.append(u) or base.read(u, c), base.num_units, "counted")
    selection = improve_data.Selection(1, True, "threshold")
    counts = improve_data.filter_counts(data, selection)
    reads.clear()
    host0 = improve_data.stream_batches(data, selection, counts, 4, LENGTHS, 0, (0, 2), num_readers=4,
                                        shuffle_buffer=2)
    for _ in range(3):
        next(host0)
    assignment = improve_data._pieces(counts.kept_per_unit, 4)  # pylint: disable=protected-access
    mine = {u for r in (0, 1) for u, _, _ in assignment[r]}
    assert set(reads) <= mine and len(mine) == 2 and all(m == 1 for p in assignment for _, _, m in p)


def test_pieces_balance_kept_rows_and_split_small_stores():
    # More readers than units: units are split into every m-th row, each reader gets rows.
    pieces = improve_data._pieces([5, 3], 4)  # pylint: disable=protected-access
    assert all(pieces)
    owned = [[(u, row) for u, j, m in r for row in range([5, 3][u]) if row % m == j] for r in pieces]
    assert sorted(x for r in owned for x in r) == [(0, i) for i in range(5)] + [(1, i) for i in range(3)]
    loads = [len(r) for r in owned]
    assert max(loads) - min(loads) <= 1
    # Many units: whole units, balanced by rows (largest first to the least loaded reader).
    pieces = improve_data._pieces([10, 1, 1, 9, 2, 7], 2)  # pylint: disable=protected-access
    assert sorted(u for r in pieces for u, _, _ in r) == list(range(6))
    loads = [sum([10, 1, 1, 9, 2, 7][u] for u, _, _ in r) for r in pieces]
    assert sorted(loads) == [14, 16]  # by hand: 10 | 9, 7 -> 16 | 10, 2, 1, 1


def test_pooled_stores_are_filtered_per_source_across_stores(tmp_path):
    a = _write_store(tmp_path / "a", _records(seed=1), grow_index=1)
    b = _write_store(tmp_path / "b", _records(seed=2), grow_index=2)
    data = improve_data.GrowData.open([a, b])
    with bound("top_k_for_step.schedule", (None, 2)), bound("validity_mask.drop_duplicates", True):
        counts = improve_data.filter_counts(data, improve_data.Selection(1, False, "top_k"))
        pooled = [grow_store.GrowStore(p).as_numpy() for p in (a, b)]
        cols = {k: np.concatenate([p[k] for p in pooled]) for k in pooled[0]}
        keep = ~cols["is_reference"]
        want = filters.apply_filters(cols["reward"][keep], cols["source_id"][keep], 1,
                                     sources=list(cols["source_text"][keep]),
                                     candidates=list(cols["candidate_text"][keep]),
                                     references=list(cols["reference_text"][keep]), method="top_k")
    # Both stores hold the same candidate texts: the duplicate check and top-2 act across them.
    assert want.dropped["duplicate"] > 0 and want.num_kept == 12 * 2
    assert counts.filter.summary() == want.summary()
    c = _write_store(tmp_path / "c", _records(seed=3), sources_per_shard=4)
    with pytest.raises(grow_store.GrowStoreMismatchError, match="cut their sources into different shards"):
        improve_data.GrowData.open([a, c])


def test_make_batch_matches_hand_layout():
    records = _records()[:3]
    rows = {c: [np.asarray(r[c]) for r in records] for c in improve_data.TRAIN_COLUMNS}
    batch = improve_data.make_batch(rows, {"inputs": 8, "targets": 6})
    for b, r in enumerate(records):
        tgt = np.asarray(r["candidate_tokens"])
        if len(tgt) > 6:  # trimmed rows still end in EOS
            tgt = np.concatenate([tgt[:5], [1]])
        np.testing.assert_array_equal(batch["decoder_target_tokens"][b, :len(tgt)], tgt)
        assert (batch["decoder_target_tokens"][b, len(tgt):] == 0).all()
        # Decoder inputs are the targets shifted right behind the start token 0.
        assert batch["decoder_input_tokens"][b, 0] == 0
        np.testing.assert_array_equal(batch["decoder_input_tokens"][b, 1:len(tgt)], tgt[:-1])
        np.testing.assert_array_equal(batch["decoder_loss_weights"][b], (np.arange(6) < len(tgt)).astype(np.float32))
        assert batch["reward"][b] == np.float32(r["reward"])


def test_empty_filter_result_is_a_clear_error(store):
    data = improve_data.GrowData.open(store)
    with bound("threshold_for_step.schedule", (0.0, 0.999999)):
        selection = improve_data.Selection(1, False, "threshold")
        with pytest.raises(ValueError, match="kept no Grow examples"):
            next(_stream(data, selection, 4, seed=0))


@pytest.mark.parametrize("fraction, batch_size, refs", [(0.25, 8, 2), (0.5, 8, 4), (1.0, 4, 4), (0.0, 4, 0)])
def test_mixed_batches_hold_a_fixed_share_of_references(store, fraction, batch_size, refs):
    # References score 1 and samples less (the fixture), so a row's reward tells which it is.
    data = improve_data.GrowData.open(store)
    selection = improve_data.Selection(0, True, "threshold")
    single = improve_data.mixed_batches(data, selection, fraction, batch_size, LENGTHS, seed=3)
    two = [improve_data.mixed_batches(data, selection, fraction, batch_size, LENGTHS, seed=3, shard=(i, 2))
           for i in range(2)]
    seen_refs = set()
    for _ in range(12):
        batch = next(single)
        is_ref = batch["reward"] == 1.0
        assert is_ref.sum() == refs and len(is_ref) == batch_size
        seen_refs.update(map(tuple, batch["encoder_input_tokens"][is_ref]))
        # Two processes' blocks hold the rows of the one-process batch.
        blocks = [next(s) for s in two]
        rows = lambda b: sorted(map(tuple, np.concatenate([b["encoder_input_tokens"], b["decoder_target_tokens"]], 1)))  # noqa: E731,E501
        assert rows({k: np.concatenate([b[k] for b in blocks]) for k in batch}) == rows(batch)
    if refs:  # 12 batches of `refs` references walk through all 12 sources' references
        assert len(seen_refs) == 12
    with pytest.raises(ValueError, match="fraction in"):
        next(improve_data.mixed_batches(data, selection, 1.5, 8, LENGTHS, seed=0))


def test_packed_mixed_batches_hold_a_fixed_share_of_packed_reference_rows(store):
    """With improve_step.pack the share is of packed rows: the first rows hold only references' examples."""
    cols = grow_store.GrowStore(store).as_numpy()
    targets = {bool(r): {tuple(t) for t, ref in zip(cols["candidate_tokens"], cols["is_reference"]) if ref == r}
               for r in (True, False)}
    assert not targets[True] & targets[False]
    data = improve_data.GrowData.open(store)
    stream = improve_data.mixed_batches(data, improve_data.Selection(0, True, "threshold"), 0.25, 8, PACKED_LENGTHS,
                                        seed=3, pack=True)
    for _ in range(4):
        batch = next(stream)
        assert batch["decoder_target_tokens"].shape == (8, 16)
        for row, (tokens, segments) in enumerate(zip(batch["decoder_target_tokens"], batch["decoder_segment_ids"])):
            for s in range(1, segments.max() + 1):
                assert tuple(tokens[segments == s]) in targets[row < 2]


def test_selection_of_references_alone_or_samples_alone(store):
    data = improve_data.GrowData.open(store)
    only_refs = improve_data.filter_counts(data, improve_data.Selection(0, True, "threshold", include_samples=False))
    only_samples = improve_data.filter_counts(data, improve_data.Selection(0, False, "threshold"))
    both = improve_data.filter_counts(data, improve_data.Selection(0, True, "threshold"))
    assert only_refs.num_kept == 12 and only_samples.num_kept == 12 * 4 == both.num_kept - 12


def test_original_pairs_as_grow_rows_for_the_control():
    class Words:
        def encode(self, text):
            return [len(w) + 2 for w in text.split()]

    data = improve_data.GrowData.from_pairs(Words(), ["a bb", "ccc"], ["dd e", "f"], {"inputs": 8, "targets": 8},
                                            sources_per_unit=1)
    assert data.num_units == 2
    cols = data.read(0, ("source_tokens", "candidate_tokens", "is_reference", "reward", "reference_text"))
    np.testing.assert_array_equal(cols["source_tokens"][0], [3, 4, 1])  # EOS-terminated, as Grow stores them
    np.testing.assert_array_equal(cols["candidate_tokens"][0], [4, 3, 1])
    assert cols["is_reference"].all() and (cols["reward"] == 1.0).all() and cols["reference_text"][0] == "dd e"


# ---------------------------------------------------------------------------------------- preference pairs


def test_pairing_rules_by_hand():
    ids = np.array([5, 5, 5, 9, 9, 7])
    rewards = np.array([0.2, 0.9, 0.2, 0.4, 0.4, 0.8])
    best_worst = improve_data.Pairing("best_worst").pairs(ids, rewards)
    assert best_worst.tolist() == [[1, 0]]  # source 9 ties, source 7 has one row; ties go to the first row
    every = improve_data.Pairing("all").pairs(ids, rewards)
    assert every.tolist() == [[1, 0], [1, 2]]
    assert improve_data.Pairing("all", min_margin=0.6).pairs(ids, rewards).tolist() == [[1, 0], [1, 2]]
    assert improve_data.Pairing("all", min_margin=0.8).pairs(ids, rewards).shape == (0, 2)
    with pytest.raises(ValueError, match="rule='best'"):
        improve_data.Pairing("best")


def _pair_keys(batch):
    """(chosen reward, rejected reward, chosen targets, rejected targets) of each interleaved pair."""
    rows = _rows(batch)
    return [(rows[2 * k][0], rows[2 * k + 1][0], rows[2 * k][1], rows[2 * k + 1][1]) for k in range(len(rows) // 2)]


@pytest.mark.parametrize("rule, margin", [("best_worst", 0.0), ("all", 0.3)])
def test_pair_stream_holds_exactly_each_sources_pairs(store, rule, margin):
    """Every pair the stream yields is one the whole store's samples give by hand, and all of them come."""
    data = improve_data.GrowData.open(store)
    pairing = improve_data.Pairing(rule, margin)
    selection = improve_data.Selection(0, include_references=False, method=None)
    cols = grow_store.GrowStore(store).as_numpy()
    samples = ~cols["is_reference"].astype(bool)
    expected = set()
    for sid in np.unique(cols["source_id"]):
        rows = np.flatnonzero(samples & (cols["source_id"] == sid))
        r = cols["reward"][rows].astype(np.float64)
        if rule == "best_worst":
            chosen = [(rows[np.argmax(r)], rows[np.argmin(r)])] if r.max() - r.min() > margin else []
        else:
            chosen = [(a, b) for a in rows for b in rows if cols["reward"][a] - cols["reward"][b] > margin]
        expected |= {(float(np.float32(cols["reward"][a])), float(np.float32(cols["reward"][b])),
                      tuple(cols["candidate_tokens"][a][:8]), tuple(cols["candidate_tokens"][b][:8]))
                     for a, b in chosen}
    counts = improve_data.filter_counts(data, selection, pairing)
    assert counts.num_kept == len(expected) > 0
    stream = improve_data.stream_batches(data, selection, counts, 8, LENGTHS, 0, pairing=pairing, num_readers=2)
    seen = set()
    for _ in range(40 * len(expected) // 4):
        batch = next(stream)
        assert batch["behaviour_log_probs"].shape == batch["decoder_target_tokens"].shape
        seen |= {(c, r, tuple(int(x) for x in tc if x), tuple(int(x) for x in tr if x))
                 for c, r, tc, tr in _pair_keys(batch)}
    assert seen == expected


def test_pair_batches_carry_the_stored_behaviour_log_probs_and_split_over_hosts(store):
    data = improve_data.GrowData.open(store)
    pairing = improve_data.Pairing()
    selection = improve_data.Selection(0, include_references=True, method=None)
    counts = improve_data.filter_counts(data, selection, pairing)
    one = improve_data.stream_batches(data, selection, counts, 8, LENGTHS, 3, pairing=pairing, num_readers=4)
    hosts = [improve_data.stream_batches(data, selection, counts, 8, LENGTHS, 3, (i, 2), pairing=pairing,
                                         num_readers=4) for i in range(2)]
    cols = grow_store.GrowStore(store).as_numpy()
    stored = {tuple(t[:8]): np.asarray(lp[:8], np.float32)
              for t, lp in zip(cols["candidate_tokens"], cols["behaviour_logprobs"])}
    for _ in range(6):
        want, parts = next(one), [next(h) for h in hosts]
        for key in want:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
        for targets, lp in zip(want["decoder_target_tokens"], want["behaviour_log_probs"]):
            n = int((targets > 0).sum())
            np.testing.assert_array_equal(lp[:n], stored[tuple(int(x) for x in targets[:n])][:n])
    with pytest.raises(ValueError, match="times 2 rows per pair"):
        next(improve_data.stream_batches(data, selection, counts, 6, LENGTHS, 3, (0, 2), pairing=pairing))
