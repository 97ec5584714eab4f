"""Improve-step data path: filtering, batching, deterministic resumable order (ReST Sec. 3)."""

import numpy as np
import pytest

from rest_jax import improve


def _data(num_sources=5, n=4, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(num_sources):
        for j in list(range(n)) + [-1]:
            length = int(rng.integers(2, 7))
            rows.append(dict(
                source_id=s, sample_id=j, is_reference=j == -1, reward=float(rng.uniform()),
                source_text=f"source {s}", candidate_text=f"cand {s} {j} " + "x" * length,
                source_tokens=np.array(list(rng.integers(3, 50, size=4)) + [1], np.int64),
                candidate_tokens=np.array(list(rng.integers(3, 50, size=length)) + [1], np.int64),
                behaviour_logprobs=-rng.uniform(size=length + 1).astype(np.float32)))
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        if isinstance(vals[0], np.ndarray):
            arr = np.empty(len(vals), object)
            arr[:] = vals
            out[k] = arr
        else:
            out[k] = np.array(vals, dtype=object if isinstance(vals[0], str) else None)
    return out


def test_filter_keeps_exactly_rewards_above_threshold():
    data = _data()
    kept, result = improve.filter_grow_data(data, 1, method="threshold", value=0.5, validity=False)
    expected = data["reward"] > 0.5
    assert result.num_kept == int(expected.sum())
    np.testing.assert_array_equal(np.sort(kept["reward"]), np.sort(data["reward"][expected]))
    kept_no_ref, _ = improve.filter_grow_data(data, 1, include_references=False, method="threshold", value=0.5,
                                              validity=False)
    assert not kept_no_ref["is_reference"].any()
    assert len(kept_no_ref["reward"]) == int((expected & ~data["is_reference"].astype(bool)).sum())


def test_make_batch_matches_hand_layout():
    data = _data()
    rows = np.array([3, 0])
    batch = improve.make_batch(data, rows, {"inputs": 8, "targets": 6})
    for b, r in enumerate(rows):
        tgt = np.asarray(data["candidate_tokens"][r])
        if len(tgt) > 6:  # trimmed rows still end in EOS
            tgt = np.concatenate([tgt[:5], [1]])
        np.testing.assert_array_equal(batch["decoder_target_tokens"][b, :len(tgt)], tgt)
        assert (batch["decoder_target_tokens"][b, len(tgt):] == 0).all()
        # Decoder inputs are the targets shifted right behind the start token 0.
        assert batch["decoder_input_tokens"][b, 0] == 0
        np.testing.assert_array_equal(batch["decoder_input_tokens"][b, 1:len(tgt)], tgt[:-1])
        np.testing.assert_array_equal(batch["decoder_loss_weights"][b], (np.arange(6) < len(tgt)).astype(np.float32))
        assert batch["reward"][b] == np.float32(data["reward"][r])
        lp = np.asarray(data["behaviour_logprobs"][r])[:6]
        np.testing.assert_array_equal(batch["mle_logprobs"][b, :len(lp)], lp)


def test_batch_stream_is_a_resumable_epoch_permutation():
    data = _data(num_sources=3, n=2)  # 9 rows
    n = len(data["reward"])
    stream = improve.batch_stream(data, 4, {"inputs": 8, "targets": 8}, seed=7)
    batches = [next(stream) for _ in range(9)]  # 36 rows = 4 epochs
    # Every epoch visits each row exactly once: check through the (unique) rewards.
    seen = np.concatenate([b["reward"] for b in batches])
    for e in range(4):
        np.testing.assert_array_equal(np.sort(seen[e * n:(e + 1) * n]), np.sort(data["reward"].astype(np.float32)))
    assert not np.array_equal(seen[:n], seen[n:2 * n])  # a new permutation each epoch
    resumed = improve.batch_stream(data, 4, {"inputs": 8, "targets": 8}, seed=7, start_step=5)
    for k in range(5, 9):
        got = next(resumed)
        for key in batches[k]:
            np.testing.assert_array_equal(got[key], batches[k][key])


def test_batch_stream_hosts_split_each_global_batch():
    """Multi-process Improve: host i's block of every batch, stacked over hosts, is the one-host batch."""
    data = _data(num_sources=3, n=2)
    lengths = {"inputs": 8, "targets": 8}
    one = improve.batch_stream(data, 4, lengths, seed=7, start_step=2)
    hosts = [improve.batch_stream(data, 4, lengths, seed=7, start_step=2, shard=(i, 2)) for i in range(2)]
    for _ in range(6):
        want = next(one)
        parts = [next(h) for h in hosts]
        for key in want:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
    with pytest.raises(ValueError, match="batch size 4 is not divisible by the 3 data shards"):
        next(improve.batch_stream(data, 4, lengths, seed=7, shard=(0, 3)))


def test_empty_filter_result_is_a_clear_error():
    data = _data()
    kept, _ = improve.filter_grow_data(data, 1, method="threshold", value=0.999999, validity=False)
    with pytest.raises(ValueError, match="kept no Grow examples"):
        next(improve.batch_stream(kept, 4, {"inputs": 8, "targets": 8}, seed=0))
