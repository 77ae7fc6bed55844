"""SGD over stacked member parameters, and the fused training step that uses it.

Each parameter has the member index as dim 0 (``[G, ...]``), so a per-member
hyperparameter ``[G]`` broadcasts as ``[G, 1, ..., 1]`` and one in-place update per
parameter tensor serves every member: no Python loop over members.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.fused.modules import FusedModule


def _per_member(values: Sequence[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32).to(device)


def _nonzero_per_member(values: Sequence[float] | torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Return ``values`` as a ``[G]`` tensor, or None when every value is 0 (no work to do)."""
    if values is None or not any(float(v) for v in values):
        return None
    return _per_member(values, device)


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View ``values`` ``[G]`` as ``[G, 1, ..., 1]`` to broadcast against ``like`` ``[G, ...]``."""
    return values.view((-1,) + (1,) * (like.dim() - 1))


class FusedSGD:
    """SGD with a learning rate, momentum and weight decay per member.

    The update of member g follows ``torch.optim.SGD`` (no dampening, no Nesterov)::

        d = grad + weight_decay[g] * p
        buf = momentum[g] * buf + d          (buf starts at zero, so step 1 gives buf = d)
        p = p - lr[g] * buf                  (or p - lr[g] * d without momentum)

    A member whose learning rate is 0 keeps its weights bitwise, provided its
    gradient is finite. Momentum and weight decay cost nothing when every member's
    value is 0, as in plain SGD.

    Args:
        params: stacked parameters, each ``[G, ...]``.
        lr: learning rates ``[G]``.
        momentum: momentum factors ``[G]``, or None for none.
        weight_decay: L2 penalties ``[G]``, or None for none.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        lr: Sequence[float] | torch.Tensor,
        momentum: Sequence[float] | torch.Tensor | None = None,
        weight_decay: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("FusedSGD needs at least one parameter")
        device = self.params[0].device
        group_size = self.params[0].shape[0]
        for p in self.params:
            if p.shape[0] != group_size:
                raise ValueError(f"parameter of shape {tuple(p.shape)} does not have {group_size} members in dim 0")
        self.lr = _per_member(lr, device)
        self.momentum = _nonzero_per_member(momentum, device)
        self.weight_decay = _nonzero_per_member(weight_decay, device)
        for name, values in (("lr", self.lr), ("momentum", self.momentum), ("weight_decay", self.weight_decay)):
            if values is not None and values.shape != (group_size,):
                raise ValueError(f"{name} has shape {tuple(values.shape)}, expected ({group_size},)")
        self.buffers = [torch.zeros_like(p) for p in self.params] if self.momentum is not None else None

    @property
    def group_size(self) -> int:
        return self.params[0].shape[0]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def set_lr(self, values: Sequence[float]) -> None:
        """Set every member's learning rate (one host-to-device copy)."""
        self.lr.copy_(torch.as_tensor(values, dtype=torch.float32))

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            if self.weight_decay is not None:
                grad = grad.addcmul(p, _broadcast(self.weight_decay, p))
            if self.buffers is not None:
                buffer = self.buffers[i]
                buffer.mul_(_broadcast(self.momentum, p)).add_(grad)
                grad = buffer
            p.addcmul_(grad, _broadcast(self.lr, p), value=-1.0)

    def select(self, members: Sequence[int], params: Sequence[nn.Parameter]) -> "FusedSGD":
        """Return the optimizer of a repacked group: the listed members' state over ``params``.

        ``params`` are the parameters of ``FusedModule.select(members)``, in the same order.
        """
        index = torch.tensor(list(members), dtype=torch.long, device=self.lr.device)
        optimizer = FusedSGD.__new__(FusedSGD)
        optimizer.params = list(params)
        optimizer.lr = self.lr.index_select(0, index)
        optimizer.momentum = None if self.momentum is None else self.momentum.index_select(0, index)
        optimizer.weight_decay = None if self.weight_decay is None else self.weight_decay.index_select(0, index)
        optimizer.buffers = None if self.buffers is None else [b.index_select(0, index) for b in self.buffers]
        return optimizer


def fused_train_step(
    model: FusedModule,
    optimizer: FusedSGD,
    x: torch.Tensor,
    y: torch.Tensor,
    shared_input: bool,
    precision_context: contextlib.AbstractContextManager | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one SGD step of every member and return its loss and mistakes, without a host sync.

    Args:
        model: the fused networks.
        optimizer: their fused SGD.
        x: float images, ``[G, B, C, H, W]``, or ``[B, C, H, W]`` with ``shared_input``.
        y: int64 labels ``[G, B]``.
        shared_input: ``x`` is one batch fed to every member.
        precision_context: the autocast context of a reduced precision, or None for fp32.

    Returns:
        The detached fp32 mean cross-entropy of each member ``[G]`` and its number of
        misclassified images ``[G]`` (int64), both on the device.

    The loss minimized is the sum over members of each member's mean cross-entropy,
    so every member receives exactly the gradient of its own mean loss.
    """
    groups, batch = y.shape
    with precision_context or contextlib.nullcontext():
        logits = model.forward_shared(x) if shared_input else model(x)
    losses = F.cross_entropy(logits.reshape(groups * batch, -1).float(), y.reshape(-1), reduction="none")
    member_loss = losses.view(groups, batch).mean(1)
    mistakes = (logits.argmax(2) != y).sum(1)
    optimizer.zero_grad()
    member_loss.sum().backward()
    optimizer.step()
    return member_loss.detach(), mistakes
