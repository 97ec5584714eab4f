"""Metric writing, progress bars and an MFU estimate shared by every loop (train, Grow, Improve, eval).

`MetricWriter(model_dir, stage)` writes TensorBoard event files (tensorboardX) under
`model_dir/<stage>/`, so `tensorboard --logdir MODEL_DIR` shows one run per stage.  Only JAX process 0
writes; other hosts of a pod slice get a silent writer.  The standard tags are listed in `METRICS`
(`python -m rest_jax.metrics` prints them as a Markdown table for the README).

`progress(iterable_or_total, desc, unit)` wraps tqdm: a bar with rate and ETA on a terminal; when stderr
is not a terminal (CI, nohup on a TPU worker) the bar is off and a log line with the same numbers is
written every `log_every_secs` instead (to the `rest_jax.console` logger, shown by default), so logs still
show progress without carriage-return noise; the final line goes to this module's logger (`--verbose`),
since each stage ends with its own summary line.

`estimate_flops_per_example` / `estimate_flops_per_token` count the matmul FLOPs of a T5 encoder-decoder
step (`estimate_decode_flops`: of sampling); with `peak_flops_per_device` (spec sheets for accelerators, a
measured matmul on CPU) they give model FLOPs utilisation (MFU), as MaxText reports it, and `throughput` the
phrase every stage's summary line ends with.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import sys
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import gin
import numpy as np
import tqdm
from etils import epath

from rest_jax.io import console

# tensorboardX's writer imports torch when it is installed, only to accept torch tensors (rest_jax passes
# NumPy values): 1-2 s added to the start of every command. Hide torch from that one import unless it is
# already loaded (a None entry in sys.modules makes `import torch` raise ImportError, which tensorboardX
# expects); a later `import torch` anywhere else loads it as usual.
_HIDE_TORCH = "torch" not in sys.modules
if _HIDE_TORCH:
    sys.modules["torch"] = None  # type: ignore[assignment]
try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
finally:
    if _HIDE_TORCH:
        del sys.modules["torch"]

logger = logging.getLogger(__name__)

# Tag -> meaning.  Stages are TensorBoard runs (subdirectories of MODEL_DIR); ReST sections refer to
# Gulcehre et al. 2023 (arXiv 2308.08998).
_STEP_METRICS = {
    "loss": "the loss per step (BC: mean token cross-entropy; Improve: the chosen loss)",
    "accuracy": "next-token accuracy on non-padding target tokens",
    "z_loss": "the auxiliary log-partition penalty (T5X's z_loss)",
    "num_tokens": "non-padding target tokens per step",
    "learning_rate": "optimizer learning rate at this step",
    "grad_norm": "global L2 norm of the gradient",
    "tokens_per_sec": "target tokens processed per second (all hosts)",
    "examples_per_sec": "examples processed per second (all hosts)",
    "step_time_sec": "wall-clock seconds per train step",
    "skipped_updates": "updates skipped for a non-finite loss or gradient (`train_loop.skip_nonfinite_updates`)",
    "mfu": "model FLOPs utilisation: FLOPs per step / step time / peak FLOP/s of all devices (accelerators: "
           "the spec sheet; CPU: a matmul measured in the model's activation dtype)",
}

# TensorBoard folder (under the stage's directory) -> tag -> meaning: what the code writes, no more, no less
# (tests/test_rest_loop.py compares a run's event files with it). Translation scores (BLEU, chrF, reward,
# best-of-N) go to each stage's <split>.<method>.json and report.json, not to TensorBoard. Improve losses
# other than BC add their own terms under `improve` (e.g. BVMPO's `kl`), and value pre-training writes the
# step metrics under `value_pretrain`.
METRICS: dict[str, dict[str, str]] = {
    "train": dict(_STEP_METRICS),
    "eval": {
        "loss": "validation cross-entropy (BC's `eval_split`)",
        "accuracy": "validation next-token accuracy",
        "num_tokens": "validation target tokens",
    },
    "grow": {
        "reward": "histogram of the rewards of all N samples per source (ReST Sec. 3, Grow)",
        "reward/mean": "mean reward of the Grow samples",
        **{f"reward/q{q}": f"{q}th percentile of the Grow samples' rewards" for q in (10, 25, 50, 75, 90)},
        "distinct_1": "distinct unigrams among the N samples of a source, averaged over sources",
        "distinct_2": "distinct bigrams among the N samples of a source, averaged over sources",
        "length_ratio": "sample length / reference length",
        "samples_per_sec": "sampled translations per second",
        "tokens_per_sec": "sampled tokens per second",
    },
    "improve": {
        **_STEP_METRICS,
        "validation_reward": "greedy validation reward, the Improve step's checkpoint selection (ReST Sec. 3)",
        "filter_value": "the filter's value: threshold tau_i of this Improve step, or the per-source cut",
        "kept_fraction": "fraction of the Grow rows kept by the filter",
        "num_kept": "number of rows kept for fine-tuning",
    },
}


def metrics_markdown() -> str:
    """The `METRICS` table as Markdown (for README / docs)."""
    lines = ["| stage | tag | meaning |", "|---|---|---|"]
    for stage, tags in METRICS.items():
        lines += [f"| {stage} | `{tag}` | {meaning} |" for tag, meaning in tags.items()]
    return "\n".join(lines)


def _is_chief() -> bool:
    # Asking JAX initialises its backends, so only ask when the program already imported it.
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


# --------------------------------------------------------------------------------------------------------
# TensorBoard.
# --------------------------------------------------------------------------------------------------------


class _EpathRecordWriter:
    """tensorboardX record sink for gs:// through etils.epath (tf.io.gfile), used when the optional
    google-cloud-storage package that tensorboardX's own GCS writer needs is absent."""

    def __init__(self, path: str):
        self._file = epath.Path(path).open("wb")

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _EpathWriterFactory:
    def open(self, path: str) -> _EpathRecordWriter:
        return _EpathRecordWriter(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


if not record_writer.GCS_ENABLED:
    record_writer.register_writer_factory("gs", _EpathWriterFactory())


@gin.configurable(denylist=["model_dir", "stage"])
class MetricWriter:
    """Writes scalars, histograms and texts for one stage to `model_dir/<stage>/` (TensorBoard events).

    Method names follow clu.metric_writers (`write_scalars(step, {...})`), familiar to Flax/T5X users.
    Use as a context manager or call `close()`; events are flushed every `flush_secs` meanwhile.
    """

    def __init__(self, model_dir: str | epath.PathLike, stage: str, flush_secs: float = 30.0,
                 log_scalars: bool = True, enabled: bool | None = None):
        """Args:
          model_dir: the run directory (local or gs://).
          stage: subdirectory and TensorBoard run name: "train", "eval", "grow_0", "improve_0_1", ...
          flush_secs: seconds between background flushes of the event file.
          log_scalars: also log each `write_scalars` call as one line (handy in CI and worker logs).
          enabled: None -> only JAX process 0 writes; True/False force it.
        """
        self.stage = stage
        self.logdir = str(epath.Path(model_dir) / stage)
        self.log_scalars = log_scalars
        self.enabled = _is_chief() if enabled is None else enabled
        self._writer = SummaryWriter(logdir=self.logdir, flush_secs=flush_secs) if self.enabled else None

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One point per tag at `step`; values may be Python, NumPy or JAX scalars."""
        if not self.enabled:
            return
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=int(step))
        if self.log_scalars and values:
            logger.info("[%s] step %d: %s", self.stage, int(step),
                        ", ".join(f"{k}={v:.6g}" for k, v in values.items()))

    def write_histograms(self, step: int, arrays: Mapping[str, Any], bins: str | int = "tensorflow") -> None:
        """A histogram per tag of all values in each array (e.g. the rewards of a Grow step)."""
        if not self.enabled:
            return
        for tag, values in arrays.items():
            flat = np.asarray(values, dtype=np.float64).reshape(-1)
            flat = flat[np.isfinite(flat)]
            if flat.size == 0:
                logger.warning("[%s] histogram %r at step %d has no finite values; skipped", self.stage, tag, step)
                continue
            self._writer.add_histogram(tag, flat, global_step=int(step), bins=bins)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Text summaries (e.g. sample translations), shown in TensorBoard's Text tab."""
        if not self.enabled:
            return
        for tag, text in texts.items():
            self._writer.add_text(tag, text, global_step=int(step))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self.enabled = False

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def quantile_metrics(values: Any, prefix: str = "reward",
                     quantiles: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9)) -> dict[str, float]:
    """`{prefix/mean, prefix/q10, ...}` of `values` (linear interpolation, as numpy.quantile)."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if flat.size == 0:
        return {}
    out = {f"{prefix}/mean": float(flat.mean())}
    for q, v in zip(quantiles, np.quantile(flat, quantiles)):
        out[f"{prefix}/q{round(q * 100):d}"] = float(v)
    return out


def distinct_n(samples: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the whitespace tokens of `samples` (the N samples of one
    source in Grow): 1.0 when no n-gram repeats, near 1/N when all samples are identical."""
    grams: collections.Counter[tuple[str, ...]] = collections.Counter()
    for s in samples:
        toks = s.split()
        grams.update(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


# --------------------------------------------------------------------------------------------------------
# Progress.
# --------------------------------------------------------------------------------------------------------


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """A tqdm bar on a terminal, periodic log lines elsewhere.  Iterate over it, or call `update(n)`."""

    def __init__(self, iterable: Iterable[Any] | None, total: int | None, desc: str, unit: str,
                 disable: bool | None, log_every_secs: float | None, file: Any, **tqdm_kwargs: Any):
        self._iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = 0
        stream = file if file is not None else sys.stderr
        chief = _is_chief()
        # Disabled bar: not a terminal, or a non-zero host of a pod (one host reporting is enough).
        self.disabled = (not _isatty(stream) or not chief) if disable is None else disable
        self._log_every = log_every_secs if chief else None
        self._bar = tqdm.tqdm(total=total, desc=desc, unit=unit, disable=self.disabled, file=stream,
                              dynamic_ncols=True, **tqdm_kwargs)
        self._start = self._last_log = time.monotonic()
        self._postfix: dict[str, Any] = {}
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        if self._iterable is None:
            raise TypeError("progress(total) is not iterable; call update(n) instead")
        try:
            for item in self._iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("progress bar without a total has no length")
        return self.total

    def update(self, n: int = 1) -> None:
        self.n += n
        self._bar.update(n)
        if self.disabled and self._log_every is not None:
            now = time.monotonic()
            if now - self._last_log >= self._log_every:
                self._last_log = now
                console.logger.info("%s", self.status_line())

    def set_postfix(self, **values: Any) -> None:
        """Extra numbers (loss, reward) shown after the bar and in the log lines."""
        self._postfix = values
        self._bar.set_postfix(values, refresh=False)

    def status_line(self, done: bool = False) -> str:
        elapsed = time.monotonic() - self._start
        rate = self.n / elapsed if elapsed > 0 else float("nan")
        parts = [f"{self.desc or 'progress'}: {self.n}"]
        if self.total:
            parts[0] += f"/{self.total} {self.unit} ({100.0 * self.n / self.total:.0f}%)"
        else:
            parts[0] += f" {self.unit}"
        parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"elapsed {tqdm.tqdm.format_interval(elapsed)}")
        if self.total and not done and rate > 0 and math.isfinite(rate):
            parts.append(f"ETA {tqdm.tqdm.format_interval(max(self.total - self.n, 0) / rate)}")
        if self._postfix:
            parts.append(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in self._postfix.items()))
        return ", ".join(parts) + (" (done)" if done else "")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bar.close()
        if self.disabled and self._log_every is not None:
            logger.info("%s", self.status_line(done=True))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@gin.configurable(allowlist=["log_every_secs"])
def progress(iterable_or_total: Iterable[Any] | int | None = None, desc: str = "", unit: str = "it", *,
             total: int | None = None, disable: bool | None = None, log_every_secs: float | None = 60.0,
             file: Any = None, **tqdm_kwargs: Any) -> Progress:
    """Progress over an iterable (`for x in progress(xs, "grow", "batch")`) or a count
    (`bar = progress(num_steps, "train", "step"); bar.update()`).

    Args:
      iterable_or_total: what to iterate, or the total count for manual `update`.
      desc, unit: label and unit shown with the rate ("step/s") and ETA.
      total: the total when the iterable has no len().
      disable: None -> bar only when `file` (default stderr) is a terminal.
      log_every_secs: with the bar off, log a status line this often (None: never); gin knob.
      file: stream for the bar (default sys.stderr).
    """
    if isinstance(iterable_or_total, int) and not isinstance(iterable_or_total, bool):
        iterable, total = None, iterable_or_total if total is None else total
    else:
        iterable = iterable_or_total
    return Progress(iterable, total, desc, unit, disable, log_every_secs, file, **tqdm_kwargs)


# --------------------------------------------------------------------------------------------------------
# FLOPs and MFU.
# --------------------------------------------------------------------------------------------------------


def estimate_flops_per_example(config: Any, inputs_length: int, targets_length: int,
                               training: bool = True) -> float:
    """Matmul FLOPs of one T5 encoder-decoder example (S input tokens, T target tokens), or of a decoder-only one.

    Counted per layer, 2 FLOPs per multiply-add, with d=emb_dim, hk=num_heads*head_dim, f=mlp_dim,
    w=len(mlp_activations) (2 for gated GELU in T5 v1.1) and V=vocab_size:
      encoder layer:  S*(4*d*hk + (w+1)*d*f)            q,k,v,o projections and MLP
                      + 2*S*S*hk                         attention scores and weighted sum
      decoder layer:  T*(4*d*hk + (w+1)*d*f) + 2*T*T*hk  self-attention and MLP (full T*T: TPUs
                                                         compute the masked half too)
                      + T*2*d*hk + S*2*d*hk + 2*T*S*hk   cross-attention: q,o on targets, k,v on
                                                         the encoder output, scores and sum
      logits:         T*d*V
    Forward = 2 * (sum of the above); training = 3 * forward (the backward pass costs two forwards).
    With S = T = 1 this is the familiar 6 * N (N = matmul parameters) plus the attention terms.
    Embedding lookups, norms and softmax are ignored (a few percent at most).
    """
    d, h, k = config.emb_dim, config.num_heads, config.head_dim
    hk, f, vocab = h * k, config.mlp_dim, config.vocab_size
    w = len(getattr(config, "mlp_activations", ("relu",)))
    s, t = inputs_length, targets_length
    mlp = (w + 1) * d * f
    if not hasattr(config, "num_encoder_layers"):
        # A decoder-only LM (`DecoderOnlyConfig`) on prompt (~S) + completion (T): grouped K/V projections,
        # causal attention over the whole row, logits on the completion only (`TranslationLM`).
        length, kv = s + t, config.num_kv_heads * k
        layer = length * (2 * d * hk + 2 * d * kv + mlp) + 2 * length * length * hk
        return float(2 * (config.num_layers * layer + t * d * vocab) * (3 if training else 1))
    enc_layer = s * (4 * d * hk + mlp) + 2 * s * s * hk
    dec_layer = t * (4 * d * hk + mlp) + 2 * t * t * hk + t * 2 * d * hk + s * 2 * d * hk + 2 * t * s * hk
    macs = config.num_encoder_layers * enc_layer + config.num_decoder_layers * dec_layer + t * d * vocab
    return float(2 * macs * (3 if training else 1))


def estimate_flops_per_token(config: Any, inputs_length: int, targets_length: int,
                             training: bool = True) -> float:
    """`estimate_flops_per_example` divided by the tokens of the example (inputs + targets)."""
    return estimate_flops_per_example(config, inputs_length, targets_length, training) / (
        inputs_length + targets_length)


def estimate_decode_flops(config: Any, num_sources: int, num_samples: int, source_length: float,
                          new_tokens: float) -> float:
    """Useful matmul FLOPs of encoding `num_sources` sources once and sampling N x `new_tokens` tokens each.

    As `rest_jax.decoding.sample` computes them: the encoder and the cross-attention keys/values once per
    source (shared by its N samples), then per new token the decoder's projections and MLP, self-attention over
    the causal prefix (on average (new_tokens + 1) / 2 keys), cross-attention over the source, and the logits.
    Lengths may be means (the padding a batch decodes is not useful work).
    """
    c = config
    d, inner, ff, acts = c.emb_dim, c.num_heads * c.head_dim, c.mlp_dim, len(c.mlp_activations)
    mlp = 2 * (acts * d * ff + ff * d)
    mean_prefix = (new_tokens + 1) / 2
    if not hasattr(c, "num_encoder_layers"):
        # Decoder-only (`decoding.sample_lm`): every sample row runs its prompt (~source_length tokens), then
        # each new token attends to the prompt and the completion so far.
        proj = 2 * (2 * d * inner + 2 * d * c.num_kv_heads * c.head_dim)
        prompt_token = c.num_layers * (proj + 2 * 2 * inner * (source_length + 1) / 2 + mlp)
        new_token = c.num_layers * (proj + 2 * 2 * inner * (source_length + mean_prefix) + mlp) + 2 * d * c.vocab_size
        return float(num_sources * num_samples * (source_length * prompt_token + new_tokens * new_token))
    enc_token = c.num_encoder_layers * (2 * 4 * d * inner + 2 * 2 * inner * source_length + mlp)
    cross_kv_token = c.num_decoder_layers * 2 * 2 * d * inner
    dec_token = c.num_decoder_layers * (2 * 4 * d * inner + 2 * 2 * inner * mean_prefix + 2 * 2 * d * inner
                                        + 2 * 2 * inner * source_length + mlp) + 2 * d * c.vocab_size
    return float(num_sources * source_length * (enc_token + cross_kv_token)
                 + num_sources * num_samples * new_tokens * dec_token)


# Dense bf16 peak FLOP/s per chip, from the vendors' spec sheets; matched against jax device_kind.
PEAK_FLOPS = (
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5p", 459e12), ("tpu v5", 459e12), ("tpu v4", 275e12), ("tpu v3", 123e12), ("tpu v2", 45e12),
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12),
)


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 3,
                         backend: str = "cpu") -> float:
    """FLOP/s of a jitted size^3 matmul in `dtype` (float32 accumulation) on the first device of `backend`.

    Measured once per process, dtype and size (under a second on a CPU, compilation included). A CPU's peak is
    not on a spec sheet (it depends on the cores this process may use and on AVX512-BF16/AMX), so the stage
    summaries compare with this instead; on an accelerator the benchmarks print it beside the spec sheet's
    (`peak_flops_per_device`), with a size large enough to fill the chip (e.g. 8192).
    """
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    device = jax.local_devices(backend=backend)[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def peak_flops_per_device(device_kind: str | None = None, dtype: str = "float32") -> float | None:
    """Peak FLOP/s of one device (default: jax.devices()[0]); None when unknown.

    Accelerators: the bf16 spec-sheet figure. CPU: `measured_matmul_peak(dtype)` shared by the host's CPU
    devices (simulated devices split one machine).
    """
    import jax  # pylint: disable=import-outside-toplevel

    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    kind = device_kind.lower()
    for key, flops in PEAK_FLOPS:
        if key in kind:
            return flops
    if kind == "cpu":
        return measured_matmul_peak(str(dtype)) / len(jax.local_devices(backend="cpu"))
    return None


def throughput(tokens_per_sec: float, flops_per_sec: float | None = None, dtype: str = "float32",
               num_devices: int | None = None) -> str:
    """'N tokens/s, X% of the <dtype> peak' for a stage summary (the peak part only where it is known).

    `flops_per_sec` is the work of `num_devices` devices (default: all of the job's).
    """
    if not math.isfinite(tokens_per_sec):
        return "no timed steps"
    text = f"{tokens_per_sec:,.0f} tokens/s"
    peak = peak_flops_per_device(dtype=dtype) if flops_per_sec and math.isfinite(flops_per_sec) else None
    if peak:
        import jax  # pylint: disable=import-outside-toplevel

        devices = jax.device_count() if num_devices is None else num_devices
        share = flops_per_sec / (peak * devices)
        text += f", {share:.1%}" if share < 0.1 else f", {share:.0%}"
        text += f" of the {dtype} peak"
    return text


def mfu(flops_per_step: float, step_time_sec: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
    """Model FLOPs utilisation of a step: achieved FLOP/s over the peak of all devices."""
    if not peak_per_device or step_time_sec <= 0 or num_devices <= 0:
        return None
    return flops_per_step / step_time_sec / (num_devices * peak_per_device)


if __name__ == "__main__":
    print(metrics_markdown())
