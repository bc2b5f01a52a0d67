"""The training methods as losses over the backbone interface (model/backbone.py)."""

from model.methods.base import LossInputs

__all__ = ["LossInputs"]
