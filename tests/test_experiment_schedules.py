"""Every experiment config fine-tunes below the rate BC ended at (ReST Sec. 3; issue 13).

Improve warm-starts from the previous policy "with a lower learning rate"; a config that binds no
`improve/learning_rate_schedule` restarts BC's schedule (and its warm-up peak) at Improve's step 0. The
schedules are built from each config as the command line parses it, and compared step by step.
"""

import pathlib

import gin
import pytest

from rest_jax import configurables, gin_utils, optim

EXPERIMENTS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs" / "experiments").glob("*.gin"))


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.name)
def test_improve_starts_below_the_rate_bc_ended_at(config):
    configurables.register()
    try:
        gin_utils.parse([str(config)], [gin_utils.Binding("MODEL_DIR = '/m'", "MODEL_DIR = '/m'")],
                        gin_utils.default_search_paths())
        bc_last = float(optim.learning_rate_schedule()(gin.query_parameter("train.num_steps")))
        improve_steps = gin.query_parameter("improve_step.num_steps")
        with gin.config_scope("improve"):
            schedule = optim.learning_rate_schedule()
        # The first Improve step (I=0, lr_decay ** 0 = 1) at its highest point.
        improve_max = max(float(schedule(s)) for s in range(0, improve_steps + 1, max(1, improve_steps // 200)))
        assert improve_max < bc_last, (config.name, improve_max, bc_last)
    finally:
        gin.clear_config()
