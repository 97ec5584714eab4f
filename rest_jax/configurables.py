"""The modules that register gin configurables, and the one way to import them all before gin parses.

What a gin file may bind, and whether a stage may import a module after gin is locked, must not depend on which
modules a caller happens to import first (gin refuses to register a configurable once the config is finalised,
and rejects a binding of one it has not seen): the command line (`rest_jax.main`) and a run's saved config read
back for inspection (`rest_jax.inspection.load_run_config`) both call `register()` first. Modules are named,
not imported, here, so that any layer may call it. tests/test_main_cli.py checks that the list is complete.
"""

from __future__ import annotations

import importlib

CONFIGURABLE_MODULES = (
    "rest_jax.checkpoints", "rest_jax.convert", "rest_jax.evaluate", "rest_jax.filters",
    "rest_jax.grow", "rest_jax.improve", "rest_jax.improve_data", "rest_jax.losses", "rest_jax.metrics",
    "rest_jax.online", "rest_jax.optim", "rest_jax.partitioning", "rest_jax.policy", "rest_jax.rest",
    "rest_jax.reward_model",
    "rest_jax.train", "rest_jax.trainer",
    "rest_jax.data.demo_corpus", "rest_jax.data.grow_store.writer", "rest_jax.data.prompts",
    "rest_jax.data.task_vocab", "rest_jax.data.tasks",
    "rest_jax.data.vocab", "rest_jax.model.decoder_only", "rest_jax.model.heads", "rest_jax.model.lora",
    "rest_jax.model.t5",
    "rest_jax.rewards.learned", "rest_jax.rewards.metricx", "rest_jax.rewards.sacrebleu_rewards",
)

# Modules without configurables that register readers into one that has them (the decoder-only Hugging Face
# families of `rest_jax convert`, which rest_jax.convert cannot import: convert_lm builds on it).
REGISTERING_MODULES = ("rest_jax.convert_lm",)


def register() -> None:
    """Imports every module in `CONFIGURABLE_MODULES` and `REGISTERING_MODULES` (call before gin parses; cheap
    when already done)."""
    for name in (*CONFIGURABLE_MODULES, *REGISTERING_MODULES):
        importlib.import_module(name)
