"""Rewards for ReST, registered by name (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 2).

    reward = rewards.get("chrf")                      # or "bleu", "ter"; gin bindings apply
    scores = rewards.score_pairs(reward, sources, candidates, references, batch_size=1024)

Every reward returns float32 scores in [0, 1] and documents its map. Model-based rewards ("metricx",
"learned") live in their own modules of this package and are imported on first `get` (see base.py).
"""

from rest_jax.rewards import sacrebleu_rewards  # noqa: F401  (registers chrf, bleu, ter)
from rest_jax.rewards.base import Reward, RewardError, check_inputs, get, names, register, score_pairs

__all__ = ["Reward", "RewardError", "check_inputs", "get", "names", "register", "score_pairs"]
