"""The sampling EMA: a copy of the network whose weights trail the trained ones.

It is distinct from SD-DiT's teacher (which the model keeps and updates itself). The
default is EDM's half-life form: after a step of B images,

    beta = 0.5 ** (B / half_life_images),  half_life_images = min(half_life, ramp * seen)

so the average forgets at the same rate in images whatever the batch size, and the
ramp-up stops the random initialisation from lingering early in training. The decay of
each step comes from the training schedule (`train.schedule.ema_beta`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter's name without activation-checkpoint or compile wrapper prefixes."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _local(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 shards both copies the same way; the update is shard-local.
    return t.to_local() if hasattr(t, "to_local") else t


class SamplingEMA:
    """Holds `module`, an eval-mode copy of the net, updated with `update(net, beta)`.

    Only trainable parameters are averaged; frozen parameters (fixed embeddings, the
    teacher, which sampling never runs) keep the copy taken at start, and buffers are
    copied as they are.
    """

    def __init__(self, net: nn.Module) -> None:
        self.module = copy.deepcopy(net).eval().requires_grad_(False)
        self._names = [n for n, p in net.named_parameters() if p.requires_grad]

    def _pairs(self, net: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        live = {clean_name(n): p for n, p in net.named_parameters()}
        mine = dict(self.module.named_parameters())
        return [_local(mine[n]) for n in self._names], [_local(live[n]) for n in self._names]

    @torch.no_grad()
    def update(self, net: nn.Module, beta: float | torch.Tensor) -> None:
        # beta may be a 0-dim device tensor (a skipped step passes 1.0 without a host read)
        ema_params, live_params = self._pairs(net)
        if ema_params:
            torch._foreach_lerp_(ema_params, [p.detach() for p in live_params], 1.0 - beta)
        self.copy_buffers(net)

    @torch.no_grad()
    def copy_buffers(self, net: nn.Module) -> None:
        """Buffers are copied as they are (the fused optimizer averages the parameters)."""
        live_buffers = {clean_name(n): b for n, b in net.named_buffers()}
        for name, buf in self.module.named_buffers():
            _local(buf).copy_(_local(live_buffers[name]))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
