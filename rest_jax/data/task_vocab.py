"""A task's vocabulary: trained on the task's own text (ReST Sec. 4: joint source-target, 32k pieces).

The `rest_jax vocab` subcommand (`train_task_vocabulary`), the copy a ReST run keeps in its model directory
(`ensure_vocabulary`), and a command line:

  python -m rest_jax.data.task_vocab --task=multi30k_de_en --output=/tmp/run/vocab \\
      --vocab_size=8000 --gin='multi30k_source.data_dir="/data/multi30k"'
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Iterable, Optional, Sequence

import gin
import tensorflow as tf

from rest_jax.data import tasks
from rest_jax.data import vocab as vocab_lib
from rest_jax.io import console


def task_training_text(task_name: str, split: str = "train") -> Iterable[str]:
    """Yields source and target sentences of a task's split (joint vocabulary)."""
    for source, target in tasks.iterate_pairs(task_name, split):
        yield source
        yield target


@gin.configurable
def train_task_vocabulary(task_name: str = gin.REQUIRED, output_dir: str = gin.REQUIRED, split: str = "train") -> str:
    """The `rest_jax vocab` subcommand: trains a joint vocabulary on `task_name`'s `split`; returns its path.

    `train_task_vocabulary.task_name = %TASK`, `.output_dir = ...`; the size and other knobs are
    `train_vocabulary`'s.
    """
    return task_vocabulary(task_name, output_dir, split)


def task_vocabulary(task_name: str, output_dir: str, split: str = "train", **kwargs) -> str:
    """Trains a joint vocabulary on `task_name`'s `split` (`kwargs` go to `train_vocabulary`); its path."""
    return vocab_lib.train_vocabulary(
        task_training_text(task_name, split),
        output_dir,
        metadata={"task": task_name, "split": split},
        **kwargs,
    )


def ensure_vocabulary(task_name: str, output_dir: str, **kwargs) -> str:
    """Returns the vocabulary in `output_dir`, training it first if absent.

    A run stores its vocabulary in its model directory; a rerun after a kill
    reuses it instead of training a (possibly different) one again.
    """
    path = os.path.join(output_dir, kwargs.get("model_name", vocab_lib.DEFAULT_MODEL_NAME))
    if tf.io.gfile.exists(path):
        return path
    started = time.perf_counter()
    path = task_vocabulary(task_name, output_dir, **kwargs)
    console.stage_done("vocabulary", time.perf_counter() - started, f"trained on {task_name}: {path}")
    return path


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help="registered task name, e.g. multi30k_de_en")
    parser.add_argument("--output", required=True, help="directory for the model (local or gs://)")
    parser.add_argument("--vocab_size", type=int, default=None, help="default: gin (32000)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--character_coverage", type=float, default=None)
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin", action="append", default=[], help="gin binding, repeatable")
    args = parser.parse_args(argv)
    gin.parse_config_files_and_bindings(args.gin_file, args.gin)
    kwargs = {}
    if args.vocab_size is not None:
        kwargs["vocab_size"] = args.vocab_size
    if args.character_coverage is not None:
        kwargs["character_coverage"] = args.character_coverage
    path = task_vocabulary(args.task, args.output, split=args.split, **kwargs)
    vocab = vocab_lib.load_vocabulary(path)
    print(f"Wrote {path} ({vocab.vocab_size} pieces).")
    return path


if __name__ == "__main__":
    main()
