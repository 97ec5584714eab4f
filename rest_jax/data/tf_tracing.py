"""tf.data pipelines traced as plain graph code, with AutoGraph only where a function needs it.

`tf.data.Dataset.map` (and `filter`, `interleave`) runs each Python function it is given through AutoGraph,
which rewrites the function's source so that Python `if`/`for` over tensors become graph ops: an AST
transformation of the function and of everything it calls, ~0.5-2.5 s per function, once per process. Only one
function our pipelines run needs it: seqio's packer (`seqio.utils._pack_with_tf_ops` loops `for i in tf.range`).
The rest (rest_jax's dataset functions, seqio's preprocessors and unpacked feature converters) trace as they
are, so the pipelines build with AutoGraph off (`without_autograph`) and packing turns it back on; this took
~3 s off the time before a 4-step `train` read its first batch. A function that does need AutoGraph (a user's
seqio preprocessor, say) fails loudly when traced without it ("using a `tf.Tensor` as a Python `bool` is not
allowed"), never computes something else, and `without_autograph` then builds the pipeline again with it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable, Iterator, TypeVar

import tensorflow as tf

try:
    # tf.data's own switch (`StructuredFunctionWrapper` asks `ag_ctx.control_status_ctx()` whether to convert).
    # The public `tf.autograph.experimental.do_not_convert` only marks functions we write, not seqio's.
    from tensorflow.python.autograph.core import ag_ctx
except ImportError:  # pragma: no cover - a TensorFlow that moved it: pipelines stay correct, only slower
    ag_ctx = None

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def autograph(enabled: bool) -> Iterator[None]:
    """Dataset functions traced inside skip AutoGraph, or go through it when `enabled`.

    The setting is per thread and only matters while a dataset function is traced, i.e. while the pipeline is
    built (`map`, `interleave`...), not while it is iterated.
    """
    if ag_ctx is None:
        yield
        return
    status = ag_ctx.Status.ENABLED if enabled else ag_ctx.Status.DISABLED
    with ag_ctx.ControlStatusCtx(status=status):
        yield


def without_autograph(build: F) -> F:
    """Decorates a pipeline builder: built with AutoGraph off, or, if one of its dataset functions needs
    AutoGraph (Python control flow over a tensor), built again as TensorFlow would by default."""

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        try:
            with autograph(False):
                return build(*args, **kwargs)
        except tf.errors.OperatorNotAllowedInGraphError as e:
            logging.info("A dataset function needs AutoGraph (%s); building %s with it.", e, build.__name__)
            return build(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
