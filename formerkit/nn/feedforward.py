"""Position-wise feed-forward parts: a plain MLP and the gated variants of Shazeer (2020), "GLU Variants Improve
Transformer"."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GatedMLP", "MLP", "activation", "build_feedforward"]


def _squared_relu(x: Tensor) -> Tensor:
    # So et al., 2021, "Primer".
    return F.relu(x).square()


def activation(name: str):
    """The element-wise function behind an activation name (the gated names use their gate's function)."""
    return {
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "squared_relu": _squared_relu,
        "silu": F.silu,
        "swiglu": F.silu,
        "geglu": F.gelu,
    }[name]


class MLP(nn.Module):
    """fc_out(dropout(act(fc_in(x))))."""

    def __init__(self, width: int, hidden_size: int, activation_name: str, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.fc_in = nn.Linear(width, hidden_size, bias=bias)
        self.fc_out = nn.Linear(hidden_size, width, bias=bias)
        self.act = activation(activation_name)
        self.dropout = nn.Dropout(dropout) if dropout else None

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.act(self.fc_in(x))
        if self.dropout is not None and self.training:
            hidden = self.dropout(hidden)
        return self.fc_out(hidden)


class GatedMLP(nn.Module):
    """fc_out(act(gate) * up), with gate and up computed by one fused projection (first half gate, second half up)."""

    def __init__(self, width: int, hidden_size: int, activation_name: str, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.fc_in = nn.Linear(width, 2 * hidden_size, bias=bias)
        self.fc_out = nn.Linear(hidden_size, width, bias=bias)
        self.act = activation(activation_name)
        self.dropout = nn.Dropout(dropout) if dropout else None

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.fc_in(x).chunk(2, dim=-1)
        hidden = self.act(gate) * up
        if self.dropout is not None and self.training:
            hidden = self.dropout(hidden)
        return self.fc_out(hidden)


def build_feedforward(config, index: int = 0) -> nn.Module:
    """The feed-forward part of layer ``index`` (its hidden size may be its own in a pruned model)."""
    ff = config.feedforward
    cls = GatedMLP if ff.gated else MLP
    return cls(config.width, config.layer_feedforward_size(index), ff.activation, ff.bias, ff.dropout)
