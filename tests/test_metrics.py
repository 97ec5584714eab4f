"""Tests for rest_jax.metrics: TensorBoard events read back with TensorFlow's own event reader, progress
quiet off a terminal, FLOP counts against a hand listing of every matmul."""

import glob
import io
import logging
import subprocess
import sys
import types

import numpy as np
import pytest

from rest_jax import metrics


def read_events(logdir):
    """All (step, tag, value-proto) in a logdir, via TensorFlow's reader (not tensorboardX's code)."""
    tf = pytest.importorskip("tensorflow")
    files = glob.glob(f"{logdir}/events.out.tfevents.*")
    assert len(files) == 1, files
    out = []
    for event in tf.compat.v1.train.summary_iterator(files[0]):
        for value in event.summary.value:
            out.append((event.step, value.tag, value))
    return out


def test_importing_the_writer_does_not_load_torch_and_torch_still_loads_after(tmp_path):
    """tensorboardX would import torch (1-2 s at every command's start); the writer must work without it."""
    torch_installed = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0
    code = (f"import sys\nfrom rest_jax import metrics\nassert 'torch' not in sys.modules, 'torch was imported'\n"
            f"with metrics.MetricWriter({str(tmp_path)!r}, 'train', enabled=True) as w:\n"
            f"    w.write_scalars(1, {{'loss': 0.5}})\n"
            + ("import torch\nassert float(torch.ones(2).sum()) == 2.0\n" if torch_installed else ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(step, tag, value.simple_value) for step, tag, value in read_events(tmp_path / "train")] == [
        (1, "loss", 0.5)]


def test_scalars_histograms_texts_are_readable_by_tensorflow(tmp_path, caplog):
    rewards = np.array([0.25, 0.5, 0.75, 1.0, 0.0])
    with caplog.at_level(logging.INFO, logger="rest_jax.metrics"):
        with metrics.MetricWriter(tmp_path, "grow_0", enabled=True) as writer:
            writer.write_scalars(1, {"loss": 2.5, "reward/mean": np.float32(0.5)})
            writer.write_scalars(2, {"loss": 1.25})
            writer.write_histograms(2, {"reward": rewards, "empty": np.array([])})
            writer.write_texts(2, {"sample": "ein Hund"})
    events = read_events(tmp_path / "grow_0")
    scalars = {(step, tag): v.simple_value for step, tag, v in events if v.WhichOneof("value") == "simple_value"}
    assert scalars[(1, "loss")] == pytest.approx(2.5)
    assert scalars[(1, "reward/mean")] == pytest.approx(0.5)
    assert scalars[(2, "loss")] == pytest.approx(1.25)
    histos = [v.histo for step, tag, v in events if tag == "reward" and step == 2]
    assert len(histos) == 1
    assert histos[0].num == 5 and histos[0].min == 0.0 and histos[0].max == 1.0
    assert histos[0].sum == pytest.approx(2.5)
    assert not [tag for _, tag, _ in events if tag == "empty"]
    texts = [v for step, tag, v in events if tag.startswith("sample")]
    assert texts and b"ein Hund" in texts[0].tensor.string_val[0]
    assert "[grow_0] step 1: loss=2.5, reward/mean=0.5" in caplog.text


def test_disabled_writer_writes_nothing(tmp_path):
    writer = metrics.MetricWriter(tmp_path, "train", enabled=False)
    writer.write_scalars(0, {"loss": 1.0})
    writer.write_histograms(0, {"x": [1.0]})
    writer.close()
    assert not (tmp_path / "train").exists()


def test_gcs_paths_have_a_writer_factory(tmp_path):
    from tensorboardX import record_writer

    assert "gs" in record_writer.REGISTERED_FACTORIES
    # Our fallback factory writes through etils.epath; exercise it on a local path.
    sink = metrics._EpathWriterFactory().open(str(tmp_path / "f"))
    sink.write(b"abc")
    sink.flush()
    sink.close()
    assert (tmp_path / "f").read_bytes() == b"abc"


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_quiet_off_a_terminal_but_logs(caplog):
    stream = io.StringIO()  # like stderr under CI or nohup
    with caplog.at_level(logging.INFO, logger="rest_jax"):
        bar = metrics.progress(range(4), "grow", "batch", file=stream, log_every_secs=0.0)
        assert bar.disabled
        bar.set_postfix(reward=0.5)
        assert list(bar) == [0, 1, 2, 3]
    assert stream.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert "grow: 2/4 batch (50%)" in lines[1] and "batch/s" in lines[1] and "ETA" in lines[1]
    assert "reward=0.5" in lines[1]
    assert lines[-1].startswith("grow: 4/4 batch (100%)") and lines[-1].endswith("(done)")
    # Progress is shown by default (the console logger); the closing line is detail, as a summary follows.
    assert {r.name for r in caplog.records[:-1]} == {"rest_jax.console"}
    assert caplog.records[-1].name == "rest_jax.metrics"


def test_progress_log_interval_limits_lines(caplog):
    with caplog.at_level(logging.INFO, logger="rest_jax.metrics"):
        bar = metrics.progress(1000, "train", "step", file=io.StringIO(), log_every_secs=3600.0)
        for _ in range(1000):
            bar.update()
        bar.close()
    assert [r.getMessage() for r in caplog.records] == [caplog.records[-1].getMessage()]
    assert caplog.records[-1].getMessage().startswith("train: 1000/1000 step (100%)")


def test_progress_draws_a_bar_on_a_terminal(caplog):
    stream = FakeTerminal()
    with caplog.at_level(logging.INFO, logger="rest_jax.metrics"):
        bar = metrics.progress(50, "train", "step", file=stream, log_every_secs=0.0, mininterval=0)
        assert not bar.disabled
        for _ in range(50):
            bar.update(1)
        bar.close()
    drawn = stream.getvalue()
    assert "train" in drawn and "50/50" in drawn and "step/s" in drawn
    assert not caplog.records  # the bar replaces the log lines


def test_quantiles_and_distinct_n_by_hand():
    out = metrics.quantile_metrics([1.0, 2.0, 3.0, 4.0, 5.0], prefix="reward", quantiles=(0.1, 0.5, 0.75))
    # numpy 'linear' quantile: position q*(n-1) -> 0.4 -> 1.4; 2.0 -> 3.0; 3.0 -> 4.0
    assert out == pytest.approx({"reward/mean": 3.0, "reward/q10": 1.4, "reward/q50": 3.0, "reward/q75": 4.0})
    samples = ["a b c", "a b d", "a b c"]
    # unigrams: a,b,c,a,b,d,a,b,c -> 4 distinct of 9; bigrams: ab,bc,ab,bd,ab,bc -> 3 of 6
    assert metrics.distinct_n(samples, 1) == pytest.approx(4 / 9)
    assert metrics.distinct_n(samples, 2) == pytest.approx(3 / 6)
    assert metrics.distinct_n(["x"], 2) == 0.0


def tiny_config(**kw):
    base = dict(vocab_size=50, emb_dim=8, num_heads=2, head_dim=3, mlp_dim=16,
                mlp_activations=("gelu", "linear"), num_encoder_layers=2, num_decoder_layers=3)
    base.update(kw)
    return types.SimpleNamespace(**base)


def matmul_flops_by_hand(c, s, t):
    """Every matmul of a T5 forward pass, written out as (rows, inner, cols)."""
    hk = c.num_heads * c.head_dim
    mm = []
    wi = len(c.mlp_activations)
    for _ in range(c.num_encoder_layers):
        mm += [(s, c.emb_dim, hk)] * 3 + [(s, hk, c.emb_dim)]          # q, k, v, out
        mm += [(s, c.head_dim, s)] * c.num_heads                       # q k^T per head
        mm += [(s, s, c.head_dim)] * c.num_heads                       # weights @ v per head
        mm += [(s, c.emb_dim, c.mlp_dim)] * wi + [(s, c.mlp_dim, c.emb_dim)]
    for _ in range(c.num_decoder_layers):
        mm += [(t, c.emb_dim, hk)] * 3 + [(t, hk, c.emb_dim)]
        mm += [(t, c.head_dim, t)] * c.num_heads + [(t, t, c.head_dim)] * c.num_heads
        mm += [(t, c.emb_dim, hk), (s, c.emb_dim, hk), (s, c.emb_dim, hk), (t, hk, c.emb_dim)]
        mm += [(t, c.head_dim, s)] * c.num_heads + [(t, s, c.head_dim)] * c.num_heads
        mm += [(t, c.emb_dim, c.mlp_dim)] * wi + [(t, c.mlp_dim, c.emb_dim)]
    mm += [(t, c.emb_dim, c.vocab_size)]
    return sum(2 * m * k * n for m, k, n in mm)


@pytest.mark.parametrize("s, t", [(1, 1), (7, 5), (32, 48)])
def test_flops_match_hand_listing(s, t):
    c = tiny_config()
    forward = matmul_flops_by_hand(c, s, t)
    assert metrics.estimate_flops_per_example(c, s, t, training=False) == forward
    assert metrics.estimate_flops_per_example(c, s, t) == 3 * forward
    assert metrics.estimate_flops_per_token(c, s, t) == pytest.approx(3 * forward / (s + t))


def test_flops_are_six_n_plus_attention_for_one_token():
    c = tiny_config(mlp_activations=("relu",))
    hk = c.num_heads * c.head_dim
    # Matmul parameters: encoder q,k,v,o + wi,wo; decoder self + cross attention + wi,wo; logits.
    n = (c.num_encoder_layers * (4 * c.emb_dim * hk + 2 * c.emb_dim * c.mlp_dim)
         + c.num_decoder_layers * (8 * c.emb_dim * hk + 2 * c.emb_dim * c.mlp_dim) + c.emb_dim * c.vocab_size)
    attention = 6 * (c.num_encoder_layers * 2 * hk + c.num_decoder_layers * 4 * hk)
    assert metrics.estimate_flops_per_example(c, 1, 1) == 6 * n + attention


def decode_flops_by_hand(c, sources, samples, s, new_tokens):
    """Sampling as `decoding.sample` runs it, step by step: encoder and cross-attention K/V once per source,
    then one token per step with self-attention over the prefix so far (the cache) and the source."""
    hk, wi = c.num_heads * c.head_dim, len(c.mlp_activations)
    per_source = []
    for _ in range(c.num_encoder_layers):
        per_source += [(s, c.emb_dim, hk)] * 3 + [(s, hk, c.emb_dim)]
        per_source += [(s, c.head_dim, s)] * c.num_heads + [(s, s, c.head_dim)] * c.num_heads
        per_source += [(s, c.emb_dim, c.mlp_dim)] * wi + [(s, c.mlp_dim, c.emb_dim)]
    per_source += [(s, c.emb_dim, hk)] * 2 * c.num_decoder_layers  # cross-attention k, v: shared by N samples
    total = sources * sum(2 * m * k * n for m, k, n in per_source)
    for step in range(1, new_tokens + 1):  # the token at `step` attends to `step` cached positions
        mm = []
        for _ in range(c.num_decoder_layers):
            mm += [(1, c.emb_dim, hk)] * 3 + [(1, hk, c.emb_dim)]
            mm += [(1, c.head_dim, step)] * c.num_heads + [(1, step, c.head_dim)] * c.num_heads
            mm += [(1, c.emb_dim, hk), (1, hk, c.emb_dim)]
            mm += [(1, c.head_dim, s)] * c.num_heads + [(1, s, c.head_dim)] * c.num_heads
            mm += [(1, c.emb_dim, c.mlp_dim)] * wi + [(1, c.mlp_dim, c.emb_dim)]
        mm += [(1, c.emb_dim, c.vocab_size)]
        total += sources * samples * sum(2 * m * k * n for m, k, n in mm)
    return total


@pytest.mark.parametrize("sources, samples, s, t", [(1, 1, 1, 1), (3, 4, 7, 5), (2, 8, 32, 48)])
def test_decode_flops_match_step_by_step_listing(sources, samples, s, t):
    c = tiny_config()
    assert metrics.estimate_decode_flops(c, sources, samples, s, t) == pytest.approx(
        decode_flops_by_hand(c, sources, samples, s, t), rel=1e-12)


def test_peak_flops_and_mfu():
    assert metrics.peak_flops_per_device("TPU v4") == 275e12
    assert metrics.peak_flops_per_device("TPU v5 lite") == 197e12
    assert metrics.peak_flops_per_device("TPU v5p") == 459e12
    assert metrics.peak_flops_per_device("NVIDIA H200") == 989e12
    assert metrics.peak_flops_per_device("some future chip") is None
    assert metrics.mfu(275e12, 2.0, 4, 275e12) == pytest.approx(0.125)
    assert metrics.mfu(1.0, 1.0, 1, None) is None


def test_cpu_peak_is_measured_per_dtype_and_shared_by_simulated_devices():
    import jax

    f32, bf16 = metrics.measured_matmul_peak("float32"), metrics.measured_matmul_peak("bfloat16")
    assert 1e9 < f32 < 1e14 and 1e9 < bf16 < 1e14  # a CPU: GFLOP/s to a few TFLOP/s
    per_device = metrics.peak_flops_per_device("cpu", "bfloat16")
    assert per_device == pytest.approx(bf16 / len(jax.local_devices(backend="cpu")))
    # The summary phrase: this much work per second is exactly the bfloat16 peak of all devices.
    text = metrics.throughput(1234.4, per_device * jax.device_count(), "bfloat16")
    assert text == "1,234 tokens/s, 100% of the bfloat16 peak"
    assert metrics.throughput(10.0, per_device, "bfloat16", num_devices=4) == "10 tokens/s, 25% of the bfloat16 peak"
    assert metrics.throughput(float("nan"), None) == "no timed steps"
