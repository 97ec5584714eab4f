"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) on a network's dense kernels.

For the large decoder-only shapes (issue 17) an Improve step (ReST Sec. 2) may train, instead of every
parameter, a pair of small matrices per chosen kernel W [in, out]: A [in, r] (random) and B [r, out] (zero at
the start), the network using W + (alpha / r) · A B. The optimizer's state then covers the adapters only, and
the step's checkpoint holds only them plus the path of the checkpoint they adapt (`rest_jax.checkpoints`
merges the two when loading, so every stage loads such a checkpoint as a whole policy).

Adapters are a tree beside the parameters': `{..., 'self_attention': {'query': {'lora_a', 'lora_b'}}}` for the
kernel `.../self_attention/query/kernel`; any network with T5X-style names works (encoder-decoder or
decoder-only).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp

from rest_jax import tree as tree_lib

PyTree = Any


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which kernels get adapters, and their size.

    Attributes:
      rank: r, the adapters' inner width.
      alpha: The update is (alpha / r) · A B (Hu et al.'s scaling: changing r keeps the update's size).
      targets: Names of the dense modules adapted (their `kernel`): T5X's attention projections by default.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: Sequence[str] = ("query", "key", "value", "out")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def adapted_modules(params: Mapping[str, Any], targets: Sequence[str]) -> list[str]:
    """Flat names ('decoder/layers_0/self_attention/query') of the 2-D kernels whose module is in `targets`."""
    names = [name[:-len("/kernel")] for name, leaf in tree_lib.flatten(params).items()
             if name.endswith("/kernel") and len(jnp.shape(leaf)) == 2 and name.split("/")[-2] in targets]
    if not names:
        raise ValueError(f"LoraConfig.targets={tuple(targets)} names no 2-D dense kernel of the network.")
    return sorted(names)


def init_adapters(params: Mapping[str, Any], config: LoraConfig, rng: jax.Array) -> dict[str, Any]:
    """Adapters for `params` (arrays or shape structs): A ~ N(0, 1/in), B = 0, so the network starts unchanged."""
    flat = tree_lib.flatten(params)
    out = {}
    for i, name in enumerate(adapted_modules(params, config.targets)):
        fan_in, fan_out = jnp.shape(flat[f"{name}/kernel"])
        out[f"{name}/lora_a"] = jax.random.normal(jax.random.fold_in(rng, i), (fan_in, config.rank),
                                                  jnp.float32) * fan_in ** -0.5
        out[f"{name}/lora_b"] = jnp.zeros((config.rank, fan_out), jnp.float32)
    return tree_lib.unflatten(out)


def merge(params: Mapping[str, Any], adapters: Mapping[str, Any], scale: float) -> dict[str, Any]:
    """`params` with every adapted kernel W replaced by W + scale · A B (float32 products); jit-friendly."""
    flat = dict(tree_lib.flatten(params))
    found = tree_lib.flatten(adapters)
    for key in found:
        if not key.endswith("/lora_a"):
            continue
        name = key[:-len("/lora_a")]
        if f"{name}/kernel" not in flat:
            raise ValueError(f"An adapter names {name}/kernel, which the network does not have.")
        kernel = flat[f"{name}/kernel"]
        delta = jnp.matmul(found[key].astype(jnp.float32), found[f"{name}/lora_b"].astype(jnp.float32))
        flat[f"{name}/kernel"] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
    return tree_lib.unflatten(flat)
