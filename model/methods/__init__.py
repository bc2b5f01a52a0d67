"""The training methods: one loss class per method, each in its own file, over the one
backbone interface (model/backbone.py), and the registry that maps a preset's method name
to its class.

    SD-DiT   model/methods/sddit.py    DiT's masked pass + self-distillation to a teacher
    DiT      model/methods/dit.py      one denoising pass
    MaskDiT  model/methods/maskdit.py  kept-token loss + MAE term, separate decoder
    MDT      model/methods/mdt.py      an unmasked and a masked pass, side-interpolater

A new method is a `Method` subclass with a `name`, `preset` and `forward` in its own file,
passed to `register_method`: then `model.build('<name>-B/2')` trains it.
"""

from __future__ import annotations

from model.methods.base import LossInputs, Method
from model.methods.dit import DiTLoss
from model.methods.maskdit import MaskDiTLoss
from model.methods.mdt import MDTLoss
from model.methods.sddit import SDDiTLoss

BUILTIN = (SDDiTLoss, DiTLoss, MaskDiTLoss, MDTLoss)
# Every method this code ships, in the chart's order.
METHODS = tuple(cls.name for cls in BUILTIN)
_REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in BUILTIN}


def register_method(cls: type[Method]) -> type[Method]:
    """Makes `cls` buildable by its name (usable as a class decorator). ValueError if the
    name is taken, empty, or one a preset name could not be read back from."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method takes a model.Method subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or "/" in name or name.endswith("-"):
        raise ValueError(f"method name must be a non-empty string without '/', got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered ({_REGISTRY[name].__name__})")
    _REGISTRY[name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Removes a method registered with `register_method` (not a built-in one)."""
    if name in METHODS:
        raise ValueError(f"{name!r} is a built-in method")
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """Every registered method: the built-in ones, then those registered since."""
    return tuple(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The loss class of a method name; ValueError naming the registered ones."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"model config: method must be one of {method_names()}, got {name!r}")
    return cls


__all__ = ["METHODS", "LossInputs", "Method", "method_class", "method_names",
           "register_method", "unregister_method"]
