"""tf.data pipelines traced as plain graph code, with AutoGraph only where a function needs it.

`tf.data.Dataset.map` (and `filter`, `interleave`) runs each Python function it is given through AutoGraph,
which rewrites the function's source so that Python `if`/`for` over tensors become graph ops: an AST
transformation of the function and of everything it calls, ~0.5-2.5 s per function, once per process. Only one
function our pipelines run needs it: seqio's packer (`seqio.utils._pack_with_tf_ops` loops `for i in tf.range`).
The rest (rest_jax's dataset functions, seqio's preprocessors and unpacked feature converters) trace as they
are, so the pipelines build with AutoGraph off, and packing turns it back on; this took ~3 s off the time before
a 4-step `train` read its first batch. A function that did need AutoGraph fails loudly when traced ("iterating
over a symbolic `tf.Tensor` is not allowed"), never computes something else.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

try:
    # tf.data's own switch (`StructuredFunctionWrapper` asks `ag_ctx.control_status_ctx()` whether to convert).
    # The public `tf.autograph.experimental.do_not_convert` only marks functions we write, not seqio's.
    from tensorflow.python.autograph.core import ag_ctx
except ImportError:  # pragma: no cover - a TensorFlow that moved it: pipelines stay correct, only slower
    ag_ctx = None


@contextlib.contextmanager
def autograph(enabled: bool) -> Iterator[None]:
    """Dataset functions traced inside (or by a function decorated with `@autograph(False)`) skip AutoGraph,
    or go through it when `enabled`.

    The setting is per thread and only matters while a dataset function is traced, i.e. while the pipeline is
    built (`map`, `interleave`...), not while it is iterated.
    """
    if ag_ctx is None:
        yield
        return
    status = ag_ctx.Status.ENABLED if enabled else ag_ctx.Status.DISABLED
    with ag_ctx.ControlStatusCtx(status=status):
        yield
