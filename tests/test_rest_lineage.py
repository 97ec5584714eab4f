"""Which policy each ReST stage starts from (ReST Alg. 1; ReST-EM, Singh et al. 2023), checked functionally.

- Improve i starts from Improve i−1 (G=1 I=0 from BC; G=2 I=0 from G=1's last): its first validation reward
  is the previous stage's best, and a stage that kept its start policy saved exactly the previous parameters.
- ReST-EM restarts every Improve from BC: first validation reward BC's; parameters BC's when kept.
- The learning rate falls with every Improve step of the policy's lineage, across Grow steps (ReST-EM: none).
- `run_rest.replay_grow_steps=1`: Improve at Grow 2 reads Grow 1's store too.
- Grow g samples from the latest policy: the Grow 2 store's behaviour log-probs are those of G=1's last
  checkpoint, recomputed here by teacher forcing (and not those of BC, when the two policies differ).
"""

import json
import os
import pathlib
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

from rest_jax import checkpoints, decoding
from rest_jax import policy as policy_lib
from rest_jax import inspection as run_inspect
from rest_jax.data import grow_store

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(run_dir: pathlib.Path, demo_dir: pathlib.Path, *extra: str) -> None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    argv = [sys.executable, "-m", "rest_jax.main", "rest", "--gin_file=experiments/demo.gin", *extra,
            f"--gin.MODEL_DIR={str(run_dir)!r}", f"--gin.demo_source.data_dir={str(demo_dir)!r}",
            *run_inspect.TINY_RUN_OVERRIDES]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _stage(path: pathlib.Path) -> dict:
    return json.loads((path / "stage.json").read_text())


def _same(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _check_starts(run: pathlib.Path, stages: list[str], from_base: bool) -> None:
    """Each stage's start policy, and its learning rate: lr_decay (0.5 here) to the power of the Improve
    steps its start policy has been through, counted across Grow steps (0 for ReST-EM, which restarts)."""
    bc = checkpoints.load_params(run / "bc" / "checkpoints")
    want = [1.0] * len(stages) if from_base else [0.5 ** k for k in range(len(stages))]
    assert [_stage(run / name)["lr_scale"] for name in stages] == pytest.approx(want)
    base_reward = _stage(run / stages[0])["curve"][0][1]  # the first Improve starts from BC in both
    prev_ckpt, prev_reward = bc, base_reward
    for name in stages:
        st = _stage(run / name)
        want_reward, want_params = (base_reward, bc) if from_base else (prev_reward, prev_ckpt)
        assert st["curve"][0][1] == want_reward, (name, st["curve"], want_reward)
        saved = checkpoints.load_params(st["checkpoint"])
        if st["best_step"] == 0:
            assert _same(saved, want_params), f"{name} kept its start policy but saved other parameters"
        prev_ckpt, prev_reward = saved, st["validation_reward"]


def _check_grow_2_policy(run: pathlib.Path, latest: str) -> None:
    """Grow 2's stored behaviour log-probs are the latest policy's (teacher-forced here), not BC's."""
    run_inspect.load_run_config(run)
    try:
        cols = grow_store.GrowStore(run / "grow_2" / "store").as_numpy(
            ["source_tokens", "candidate_tokens", "behaviour_logprobs"])
        rows = range(0, len(cols["candidate_tokens"]), 7)  # a spread of records
        vocab = str(run / "vocab" / "sentencepiece.model")

        def logprobs(checkpoint: str) -> list[np.ndarray]:
            policy = policy_lib.load_policy(checkpoint, vocab)
            out = []
            for r in rows:
                scores = decoding.token_scores(policy.params, policy.model, {
                    "encoder_input_tokens": decoding.pad_to_bucket([cols["source_tokens"][r]]),
                    "decoder_target_tokens": decoding.pad_to_bucket([cols["candidate_tokens"][r]])})
                out.append(np.asarray(scores)[0, :len(cols["candidate_tokens"][r])])
            return out

        stored = [cols["behaviour_logprobs"][r] for r in rows]
        for got, want in zip(logprobs(latest), stored):
            np.testing.assert_allclose(got, want, atol=2e-4)
        if not _same(checkpoints.load_params(latest), checkpoints.load_params(run / "bc" / "checkpoints")):
            bc = logprobs(str(run / "bc" / "checkpoints"))
            assert max(np.abs(a - b).max() for a, b in zip(bc, stored)) > 1e-3
    finally:
        gin.clear_config()


@pytest.mark.slow
def test_rest_stages_start_from_the_previous_policy(tmp_path):
    run = tmp_path / "rest"
    _run(run, tmp_path / "demo", "--gin.run_rest.num_grow_steps=2", "--gin.improve_step.lr_decay=0.5",
         "--gin.run_rest.replay_grow_steps=1")
    stages = ["grow_1/improve_0", "grow_1/improve_1", "grow_2/improve_0", "grow_2/improve_1"]
    _check_starts(run, stages, from_base=False)
    # Replay: Improve at Grow 2 filters the records of both stores (I=0 keeps all but the invalid ones).
    records = [len(grow_store.GrowStore(run / f"grow_{g}" / "store").as_numpy(["reward"])["reward"]) for g in (1, 2)]
    assert _stage(run / "grow_1/improve_0")["filter"]["num_examples"] == records[0]
    assert _stage(run / "grow_2/improve_0")["filter"]["num_examples"] == sum(records)
    _check_grow_2_policy(run, _stage(run / "grow_1/improve_1")["checkpoint"])


@pytest.mark.slow
def test_rest_em_restarts_every_improve_from_bc(tmp_path):
    run = tmp_path / "em"
    _run(run, tmp_path / "demo", "--gin_file=runs/rest_em.gin", "--gin.NUM_ITERATIONS=2",
         "--gin.threshold_for_step.schedule=[0.0, 0.05]", "--gin.improve_step.lr_decay=0.5")
    stages = ["grow_1/improve_1", "grow_2/improve_1"]
    _check_starts(run, stages, from_base=True)
    _check_grow_2_policy(run, _stage(run / "grow_1/improve_1")["checkpoint"])
