"""dsphere training side: D-SphereNet layers, models, objectives, attacks, training,
angle statistics, export and evaluation (python -m training ...)."""

from training.layers import SphereConv2d, SphereLinear, sphere_corr

__all__ = ["SphereConv2d", "SphereLinear", "sphere_corr"]
