"""rest_jax: Reinforced Self-Training (ReST, Gulcehre et al. 2023) for machine translation in JAX/Flax."""

__version__ = "0.1.0"
