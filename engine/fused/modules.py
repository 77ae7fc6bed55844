"""Horizontally fused shallow CNNs and MLPs: G independent networks in one module.

Every parameter of a fused module is stacked along a leading member dimension of size
G, so member g's weights are ``param[g]``. That layout lets one SGD step with a ``[G]``
learning-rate tensor update all members at once, and lets a group drop finished
members by slicing dim 0. Members never exchange values: member g's outputs and
gradients depend only on member g's weights and inputs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.registry import InputSpec
from engine.models.shallow import MLP, ShallowCNN


class FusedModule(nn.Module):
    """Base of the fused families: G members of one architecture, member index first.

    Subclasses provide ``forward`` (member-major input ``[G, B, C, H, W]``),
    ``forward_shared`` (one batch ``[B, C, H, W]`` seen by every member), both
    returning logits ``[G, B, classes]``, and the member conversions below.
    """

    group_size: int
    spec: InputSpec
    # Run convolutions in channels_last layout. On a 2-core AVX-512 CPU (PyTorch 2.13,
    # oneDNN 3.12) the forward and backward of a grouped 5x5 convolution ran about 3x
    # faster in channels_last than in NCHW. On CUDA it stays NCHW, PyTorch's default,
    # because neither layout has been measured there.
    channels_last: bool = False

    def member(self, g: int) -> nn.Module:
        """Return an ordinary module containing an exact copy of member ``g``'s weights."""
        raise NotImplementedError

    def load_member(self, g: int, module: nn.Module) -> None:
        """Copy the weights of an ordinary module into member slot ``g`` (bitwise)."""
        raise NotImplementedError

    def empty_like(self, group_size: int) -> "FusedModule":
        """Return an uninitialized fused module of the same architecture with ``group_size`` members."""
        raise NotImplementedError

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def select(self, members: Sequence[int]) -> "FusedModule":
        """Return a new fused module made of the listed members, in that order.

        The weights are exact copies (``index_select`` along dim 0), so a group can
        drop finished members and continue where it was.
        """
        if not members:
            raise ValueError("select needs at least one member")
        if min(members) < 0 or max(members) >= self.group_size:
            raise ValueError(f"members {list(members)} out of range for a group of {self.group_size}")
        index = torch.tensor(list(members), dtype=torch.long, device=self.device)
        fused = self.empty_like(len(members)).to(self.device)
        fused.channels_last = self.channels_last
        with torch.no_grad():
            for target, source in zip(fused.parameters(), self.parameters()):
                target.copy_(source.index_select(0, index))
        return fused

    def _check_slot(self, g: int) -> None:
        if not 0 <= g < self.group_size:
            raise IndexError(f"member {g} out of range for a group of {self.group_size}")


class FusedShallowCNN(FusedModule):
    """G shallow CNNs of width w: grouped 5x5 convolution, ReLU, 2x2 max pool, batched linear.

    Layouts (G members, B images, C channels, w filters, K classes, F = w*H/2*W/2):

    - ``conv_weight`` ``[G, w, C, 5, 5]``, viewed as ``[G*w, C, 5, 5]`` for the
      convolution; ``conv_bias`` ``[G, w]``.
    - ``fc_weight`` ``[G, F, K]`` (member g's ``Linear.weight`` transposed, as
      ``baddbmm`` wants it); ``fc_bias`` ``[G, K]``.
    - ``forward``: input ``[G, B, C, H, W]``, laid out as ``[B, G*C, H, W]`` for a
      convolution with ``groups=G``; output logits ``[G, B, K]``.
    - ``forward_shared``: input ``[B, C, H, W]`` seen by every member. The first
      layer is then one dense convolution with G*w output channels (the same weight
      tensor, ``groups=1``), which is faster than a grouped one over G copies.
    """

    def __init__(self, group_size: int, width: int, spec: InputSpec, initialize: bool = True) -> None:
        super().__init__()
        if group_size < 1:
            raise ValueError(f"group_size={group_size} must be at least 1")
        if spec.height % 2 or spec.width % 2:
            raise ValueError(f"shallow CNN needs even image sides, got {spec.height}x{spec.width}")
        self.group_size = group_size
        self.width = width
        self.spec = spec
        self.features = width * (spec.height // 2) * (spec.width // 2)
        self.conv_weight = nn.Parameter(torch.empty(group_size, width, spec.channels, 5, 5))
        self.conv_bias = nn.Parameter(torch.empty(group_size, width))
        self.fc_weight = nn.Parameter(torch.empty(group_size, self.features, spec.num_classes))
        self.fc_bias = nn.Parameter(torch.empty(group_size, spec.num_classes))
        if initialize:
            # Each member gets PyTorch's default Conv2d/Linear initialization, drawn
            # from the global RNG exactly as G separate ShallowCNNs would draw it.
            for g in range(group_size):
                self.load_member(g, ShallowCNN(width, spec))

    def empty_like(self, group_size: int) -> "FusedShallowCNN":
        return FusedShallowCNN(group_size, self.width, self.spec, initialize=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups, batch = x.shape[0], x.shape[1]
        if groups != self.group_size:
            raise ValueError(
                f"input has {groups} members but the module has {self.group_size}; pass [G, B, C, H, W]"
            )
        x = x.transpose(0, 1).reshape(batch, groups * self.spec.channels, *x.shape[3:])
        return self.forward_grouped(x)

    def forward_grouped(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[G, B, K]`` of batch-major input ``[B, G*C, H, W]``."""
        x, weight = self._conv_operands(x)
        x = F.conv2d(x, weight, self.conv_bias.flatten(), padding=2, groups=self.group_size)
        return self._head(x)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[G, B, K]`` of one batch ``[B, C, H, W]`` fed to every member."""
        x, weight = self._conv_operands(x)
        x = F.conv2d(x, weight, self.conv_bias.flatten(), padding=2)
        return self._head(x)

    def _conv_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.conv_weight.flatten(0, 1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            weight = weight.contiguous(memory_format=torch.channels_last)
        return x, weight

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, G*w, H, W] -> pooled [B, G*w, H/2, W/2] -> per member [G, B, F].
        # Pooling before the ReLU gives the same outputs and gradients, because ReLU
        # is monotonic, and runs the ReLU on a tensor 4x smaller.
        x = torch.relu(F.max_pool2d(x, 2))
        x = x.reshape(x.shape[0], self.group_size, self.features).transpose(0, 1)
        return torch.baddbmm(self.fc_bias.unsqueeze(1), x, self.fc_weight)

    def member(self, g: int) -> ShallowCNN:
        self._check_slot(g)
        # Built on the meta device, so making the copy draws nothing from the global RNG.
        with torch.device("meta"):
            module = ShallowCNN(self.width, self.spec)
        module.to_empty(device=self.device)
        with torch.no_grad():
            module.conv.weight.copy_(self.conv_weight[g])
            module.conv.bias.copy_(self.conv_bias[g])
            module.fc.weight.copy_(self.fc_weight[g].t())
            module.fc.bias.copy_(self.fc_bias[g])
        return module

    def load_member(self, g: int, module: nn.Module) -> None:
        self._check_slot(g)
        if not isinstance(module, ShallowCNN) or module.width != self.width:
            raise TypeError(f"member {g} must be a ShallowCNN of width {self.width}, got {type(module).__name__}")
        if module.fc.weight.shape != (self.spec.num_classes, self.features):
            raise ValueError(
                f"member {g} has fc weight {tuple(module.fc.weight.shape)}, "
                f"expected {(self.spec.num_classes, self.features)} for input {self.spec}"
            )
        with torch.no_grad():
            self.conv_weight[g].copy_(module.conv.weight)
            self.conv_bias[g].copy_(module.conv.bias)
            self.fc_weight[g].copy_(module.fc.weight.t())
            self.fc_bias[g].copy_(module.fc.bias)


class FusedMLP(FusedModule):
    """G MLPs of one depth and hidden width, every layer a batched matmul (``baddbmm``).

    Layouts (G members, B images, D = C*H*W inputs, h hidden units, K classes):

    - ``weights[i]`` ``[G, in_i, out_i]`` (member g's ``Linear.weight`` transposed)
      and ``biases[i]`` ``[G, out_i]``, for i = 0..depth; the last pair is the
      output layer. in/out run D -> h -> ... -> h -> K.
    - ``forward``: input ``[G, B, C, H, W]``, flattened to ``[G, B, D]``; output
      logits ``[G, B, K]``.
    - ``forward_shared``: input ``[B, C, H, W]`` seen by every member, expanded
      (without a copy) to ``[G, B, D]``.
    """

    def __init__(self, group_size: int, depth: int, hidden: int, spec: InputSpec, initialize: bool = True) -> None:
        super().__init__()
        if group_size < 1:
            raise ValueError(f"group_size={group_size} must be at least 1")
        if depth < 1 or hidden < 1:
            raise ValueError(f"MLP needs depth >= 1 and hidden >= 1, got {depth} and {hidden}")
        self.group_size = group_size
        self.depth = depth
        self.hidden = hidden
        self.spec = spec
        sizes = [spec.channels * spec.height * spec.width] + [hidden] * depth + [spec.num_classes]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(group_size, sizes[i], sizes[i + 1])) for i in range(depth + 1)
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(group_size, sizes[i + 1])) for i in range(depth + 1)
        )
        if initialize:
            for g in range(group_size):
                self.load_member(g, MLP(depth, hidden, spec))

    def empty_like(self, group_size: int) -> "FusedMLP":
        return FusedMLP(group_size, self.depth, self.hidden, self.spec, initialize=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.group_size:
            raise ValueError(
                f"input has {x.shape[0]} members but the module has {self.group_size}; pass [G, B, C, H, W]"
            )
        return self._layers(x.reshape(x.shape[0], x.shape[1], -1))

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``[G, B, K]`` of one batch ``[B, C, H, W]`` fed to every member."""
        x = x.reshape(1, x.shape[0], -1).expand(self.group_size, -1, -1)
        return self._layers(x)

    def _layers(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(bias.unsqueeze(1), x, weight)
            if i < last:
                x = torch.relu(x)
        return x

    def _linears(self, module: MLP) -> list[nn.Linear]:
        return [*module.hidden_layers, module.out]

    def member(self, g: int) -> MLP:
        self._check_slot(g)
        with torch.device("meta"):
            module = MLP(self.depth, self.hidden, self.spec)
        module.to_empty(device=self.device)
        with torch.no_grad():
            for linear, weight, bias in zip(self._linears(module), self.weights, self.biases):
                linear.weight.copy_(weight[g].t())
                linear.bias.copy_(bias[g])
        return module

    def load_member(self, g: int, module: nn.Module) -> None:
        self._check_slot(g)
        if not isinstance(module, MLP) or (module.depth, module.hidden) != (self.depth, self.hidden):
            raise TypeError(
                f"member {g} must be an MLP of depth {self.depth} and hidden width {self.hidden}, "
                f"got {type(module).__name__}"
            )
        linears = self._linears(module)
        inputs, classes = self.weights[0].shape[1], self.weights[-1].shape[2]
        if linears[0].in_features != inputs or linears[-1].out_features != classes:
            raise ValueError(
                f"member {g} maps {linears[0].in_features} inputs to {linears[-1].out_features} classes, "
                f"expected {inputs} to {classes} for input {self.spec}"
            )
        with torch.no_grad():
            for linear, weight, bias in zip(linears, self.weights, self.biases):
                weight[g].copy_(linear.weight.t())
                bias[g].copy_(linear.bias)


def prefers_channels_last(device: torch.device) -> bool:
    """Return the convolution layout fused modules use on ``device`` (see ``FusedModule.channels_last``)."""
    return device.type == "cpu"


def is_fusable(module: nn.Module) -> bool:
    """Return whether a fused family exists for this module's architecture."""
    return isinstance(module, (ShallowCNN, MLP))


def empty_fused_like(template: nn.Module, group_size: int, spec: InputSpec) -> FusedModule:
    """Return an uninitialized fused module of ``group_size`` copies of ``template``'s architecture.

    Raises:
        TypeError: the architecture has no fused family (only ShallowCNN and MLP do).
    """
    if isinstance(template, ShallowCNN):
        return FusedShallowCNN(group_size, template.width, spec, initialize=False)
    if isinstance(template, MLP):
        return FusedMLP(group_size, template.depth, template.hidden, spec, initialize=False)
    raise TypeError(
        f"no fused version of {type(template).__name__}; fused training supports ShallowCNN and MLP, "
        "train other models one by one"
    )


def fuse_members(members: Sequence[nn.Module], spec: InputSpec) -> FusedModule:
    """Stack ordinary modules of one architecture into a fused module (exact copies).

    The fused module lives on the device of the first member's parameters, with the
    convolution layout that ``prefers_channels_last`` picks for that device.
    """
    if not members:
        raise ValueError("fuse_members needs at least one module")
    device = next(members[0].parameters()).device
    fused = empty_fused_like(members[0], len(members), spec).to(device)
    fused.channels_last = prefers_channels_last(device)
    for g, module in enumerate(members):
        fused.load_member(g, module)
    return fused
