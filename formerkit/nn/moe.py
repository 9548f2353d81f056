"""A mixture-of-experts feed-forward: a learned router sends each token to a few of several feed-forwards.

Shazeer et al., 2017, "Outrageously Large Neural Networks" (top-k gating); Fedus et al., 2021, "Switch Transformers"
(capacity factor, load-balancing loss); Jiang et al., 2024, "Mixtral of Experts" (gates renormalized over the top k).
The experts are the plain feed-forwards of ``formerkit.nn.feedforward``; only the routing is new here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from formerkit.errors import ConfigError
from formerkit.nn.feedforward import build_feedforward

__all__ = ["MoEFeedForward", "Routing", "build_moe", "load_balancing_loss"]


@dataclass
class Routing:
    """What one pass of a mixture layer did.

    aux_loss: the load-balancing loss (unweighted; in the autograd graph through the router).
    expert_counts: [num_experts] token assignments routed to each expert (before capacity; padding excluded).
    dropped_counts: [num_experts] of those, the assignments the expert's capacity dropped (zeros without capacity).
    """

    aux_loss: Tensor
    expert_counts: Tensor
    dropped_counts: Tensor


def load_balancing_loss(probabilities: Tensor, expert_counts: Tensor, experts_per_token: int) -> Tensor:
    """Switch Transformer's auxiliary loss, with top-k assignments: ``E * sum_e f_e * P_e``.

    probabilities: [tokens, E] router softmax of the tokens that count (padding left out).
    expert_counts: [E] how many of the ``tokens * k`` top-k assignments went to each expert.
    f_e = expert_counts[e] / (tokens * k), the fraction of assignments routed to e (not differentiable);
    P_e = mean over tokens of probabilities[:, e], the router's mean probability for e (the gradient flows here).
    Both are distributions over the experts, so the loss is 1 when routing is perfectly even and grows to E when every
    token's probability and assignments pile onto one expert (with k = 1). No tokens: 0.
    """
    tokens, num_experts = probabilities.shape
    if tokens == 0:
        return probabilities.sum() * 0.0
    fraction = expert_counts.to(probabilities.dtype) / (tokens * experts_per_token)
    return num_experts * (fraction * probabilities.mean(dim=0)).sum()


class MoEFeedForward(nn.Module):
    """``num_experts`` feed-forwards and a router; each token's output is the gate-weighted sum of its chosen
    experts' outputs, and each expert runs only on the tokens routed to it.

    Routing: p = softmax(router(x)) over the experts (router: a bias-free linear map, computed in float32); a token
    goes to its ``k = experts_per_token`` most probable experts. Its gates are those k probabilities divided by their
    sum (Mixtral), so they sum to 1 and the output keeps the dense feed-forward's scale. With k = 1 the gate is the
    probability itself, as in the Switch Transformer: a renormalized single gate would always be 1 and the router would
    learn from the balancing loss alone.

    Capacity (``capacity_factor``, while training only): expert e takes at most
    ``ceil(capacity_factor * tokens * k / num_experts)`` assignments of the pass; ``tokens`` counts real tokens only.
    Assignments are served in priority order: every token's first choice before any token's second choice (GShard),
    and within one choice rank by the token's place in the flattened [batch, tokens] input (row by row). Those past an
    expert's capacity are dropped: they add nothing, so a token whose every choice is dropped passes through the block
    on its residual alone. Evaluation drops nothing, so a token's output never depends on the rest of the batch there
    and decoding with a key/value cache equals recomputing.

    Padding (``keep`` False) is routed nowhere: no expert runs on it, it takes no capacity, it does not count in the
    balancing loss, and its output is zero.

    Dispatch: the assignments are grouped by expert with a stable sort (so each group stays in priority order), each
    expert runs once on its group, and the gate-weighted outputs are added back at their tokens (a scatter-add). An
    expert no token chose is not called. On the ``meta`` device (shapes only, as ``formerkit.summary`` runs it) the
    group sizes are unknowable, so the assignments are split evenly: FLOPs counted there are those of perfectly
    balanced routing.

    After every call, ``last_routing`` holds that pass's ``Routing`` (balancing loss, per-expert counts).
    """

    def __init__(self, width: int, experts: list[nn.Module], experts_per_token: int,
                 capacity_factor: float | None = None):
        super().__init__()
        if len(experts) < 2 or not 1 <= experts_per_token <= len(experts):
            raise ConfigError("experts_per_token", experts_per_token,
                              f"an integer in [1, {len(experts)}] (the number of experts, at least 2)")
        self.router = nn.Linear(width, len(experts), bias=False)
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(experts)
        self.experts_per_token = experts_per_token
        self.capacity_factor = capacity_factor
        self.last_routing: Routing | None = None

    def capacity(self, tokens: int) -> int:
        """The most assignments one expert takes from a pass over ``tokens`` real tokens (while training)."""
        return math.ceil(self.capacity_factor * tokens * self.experts_per_token / self.num_experts)

    def route(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router probabilities [n, E], the chosen experts [n, k] (most probable first) and their gates [n, k]."""
        probabilities = self.router(tokens).float().softmax(dim=-1)
        chosen_probabilities, chosen = probabilities.topk(self.experts_per_token, dim=-1)
        gates = chosen_probabilities
        if self.experts_per_token > 1:
            gates = chosen_probabilities / chosen_probabilities.sum(dim=-1, keepdim=True)
        return probabilities, chosen, gates

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """x [..., width]; ``keep`` (x's shape without width; True for a real token) leaves padding out."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        real = None if keep is None else keep.reshape(-1).to(torch.bool)
        if real is not None and flat.device.type != "meta":
            rows = real.nonzero().squeeze(1)
        else:
            rows = torch.arange(flat.shape[0], device=flat.device)
        probabilities, chosen, gates = self.route(flat[rows])
        k, num_experts = self.experts_per_token, self.num_experts
        # Assignments in priority order: choice rank first, then token order (transposing [n, k] to [k, n]).
        assigned_experts = chosen.t().reshape(-1)
        assigned_rows = rows.repeat(k)
        assigned_gates = gates.t().reshape(-1)
        counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
        counts.scatter_add_(0, assigned_experts, torch.ones_like(assigned_experts))
        order = torch.argsort(assigned_experts, stable=True)
        sorted_rows, sorted_gates = assigned_rows[order], assigned_gates[order]
        if flat.device.type == "meta":
            total = assigned_experts.shape[0]
            sizes = [total // num_experts + (e < total % num_experts) for e in range(num_experts)]
        else:
            sizes = counts.tolist()
        limit = self.capacity(rows.shape[0]) if self.capacity_factor is not None and self.training else None
        output = torch.zeros_like(flat)
        dropped = []
        for expert, group_rows, group_gates in zip(self.experts, sorted_rows.split(sizes), sorted_gates.split(sizes)):
            if limit is not None:
                dropped.append(max(group_rows.shape[0] - limit, 0))
                group_rows, group_gates = group_rows[:limit], group_gates[:limit]
            if group_rows.shape[0] == 0:
                continue
            out = expert(flat[group_rows])
            # index_put_ with accumulate is index_add_ along rows; index_add_ of rows on CPU was measured ~10^4 times
            # slower here (it parallelizes over the width, and waking threads dominates for small groups).
            output.index_put_((group_rows,), (out * group_gates.unsqueeze(1).to(out.dtype)).to(output.dtype),
                              accumulate=True)
        dropped_counts = (torch.tensor(dropped, device=flat.device) if dropped
                          else torch.zeros(num_experts, dtype=torch.long, device=flat.device))
        self.last_routing = Routing(aux_loss=load_balancing_loss(probabilities, counts, k),
                                    expert_counts=counts.detach(), dropped_counts=dropped_counts)
        return output.reshape(shape)

    def extra_repr(self) -> str:
        capacity = f", capacity_factor={self.capacity_factor}" if self.capacity_factor is not None else ""
        return f"num_experts={self.num_experts}, experts_per_token={self.experts_per_token}{capacity}"


def build_moe(config) -> MoEFeedForward:
    """The mixture a ModelConfig describes: ``feedforward.num_experts`` copies of its dense feed-forward."""
    ff = config.feedforward
    experts = [build_feedforward(config) for _ in range(ff.num_experts)]
    return MoEFeedForward(config.width, experts, ff.experts_per_token, ff.capacity_factor)
