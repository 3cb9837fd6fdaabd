"""Training losses."""

from automodel_jax.losses.cross_entropy import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
