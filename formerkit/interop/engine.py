"""The conversion engine shared by every Hugging Face family: weight rules, the family interface and its registry,
and the checks that make a conversion exact.

A family (one module each, such as ``gpt2`` or ``llama``) is a ``Family``: the Hugging Face config read into a
ModelConfig, a ModelConfig written back as one, and one table of ``Rule``s that serves both directions. The engine
knows no family; ``formerkit.interop.hf`` lists them in a ``Registry``.

Two layout facts the rules encode: formerkit fuses the query, key and value projections into one ``qkv`` Linear stacked
[q | k | v] along the output dimension (with grouped-query attention k and v have ``num_kv_heads * head_dim`` rows
each), and a gated MLP's gate and up projections into one ``fc_in`` stacked [gate | up]. GPT-2's ``Conv1D`` stores its
weights [in, out], the transpose of ``nn.Linear``'s [out, in]. Checkpoints that order those rows otherwise (GPT-NeoX's
and Falcon's fused projections interleave q, k and v per head; GPT-J's rotary pairs interleave channels) are read and
written through a fixed row permutation (the "permuted" layout).
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from formerkit.config import ModelConfig
from formerkit.errors import InteropError
from formerkit.interop.files import CONFIG_FILE, Fields

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_NAMES",
    "GATED_ACTIVATIONS",
    "GATED_ACTIVATION_NAMES",
    "QKV_NAMES",
    "Family",
    "Registry",
    "Rule",
    "assign",
    "check_coverage",
    "check_round_trip",
    "feedforward_hidden_size",
    "grouped_qkv_order",
    "hf_name",
    "hf_state",
    "interleaved_rotary_order",
    "label_fields",
    "pair",
    "permuted",
    "stack",
    "lm_head_rules",
    "windowed_layers",
]

# Hugging Face activation names (hidden_act, activation_function) -> the formerkit activation computing the same
# function. "gelu_new" spells GELU's tanh approximation out by hand; formerkit uses torch's, equal up to float rounding.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
               "silu": "silu", "swish": "silu"}
# formerkit -> the name written; "gelu_pytorch_tanh" is torch's tanh GELU, exactly what formerkit runs.
ACTIVATION_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
# A LLaMA-family MLP computes act(gate) * up: formerkit's gated activations, by their gate's function.
GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}
GATED_ACTIVATION_NAMES = {"swiglu": "silu", "geglu": "gelu"}
# BERT's and ViT's names for the query, key and value projections.
QKV_NAMES = ("query", "key", "value")


# ----- weight rules: one formerkit parameter <-> the Hugging Face tensors it is made of -----


@dataclass(frozen=True)
class Rule:
    """One formerkit parameter and the Hugging Face tensor(s) holding the same numbers.

    ``layout`` says how: "same" (copied), "transposed" (GPT-2's Conv1D, [in, out]), "stacked" (several tensors
    concatenated along dim 0, ``sizes`` rows each: fused q/k/v, fused gate/up), "batched" (the Hugging Face tensor
    has a leading dimension of 1: ViT's position table), "offset" (the Hugging Face table has ``sizes[0]`` rows in
    front that formerkit's positions never index: RoBERTa's and OPT's position tables; they are written as zeros) or
    "permuted" (stacked, then the rows taken in ``order``: row i of ours is row ``order[i]`` of the concatenation, and
    writing applies the inverse permutation).
    """

    ours: str
    theirs: tuple[str, ...]
    layout: str = "same"
    sizes: tuple[int, ...] = ()
    order: tuple[int, ...] = ()

    def their_shapes(self, shape: torch.Size) -> list[tuple[int, ...]]:
        """The shapes the Hugging Face tensors have for a formerkit parameter of ``shape``."""
        shape = tuple(shape)
        if self.layout == "transposed":
            return [shape[::-1]]
        if self.layout in ("stacked", "permuted"):
            return [(rows, *shape[1:]) for rows in self.sizes]
        if self.layout == "batched":
            return [(1, *shape)]
        if self.layout == "offset":
            return [(shape[0] + self.sizes[0], *shape[1:])]
        return [shape]

    def to_ours(self, parts: list[Tensor]) -> Tensor:
        if self.layout == "transposed":
            return parts[0].t()
        if self.layout == "stacked":
            return torch.cat(parts, dim=0)
        if self.layout == "permuted":
            return torch.cat(parts, dim=0)[list(self.order)]
        if self.layout == "batched":
            return parts[0].squeeze(0)
        if self.layout == "offset":
            return parts[0][self.sizes[0]:]
        return parts[0]

    def to_theirs(self, tensor: Tensor) -> dict[str, Tensor]:
        if self.layout == "transposed":
            parts = [tensor.t()]
        elif self.layout == "stacked":
            parts = list(tensor.split(list(self.sizes), dim=0))
        elif self.layout == "permuted":
            inverse = torch.empty(len(self.order), dtype=torch.long)
            inverse[list(self.order)] = torch.arange(len(self.order))
            parts = list(tensor[inverse].split(list(self.sizes), dim=0))
        elif self.layout == "batched":
            parts = [tensor.unsqueeze(0)]
        elif self.layout == "offset":
            parts = [torch.cat([tensor.new_zeros(self.sizes[0], *tensor.shape[1:]), tensor])]
        else:
            parts = [tensor]
        return dict(zip(self.theirs, parts))


def pair(ours: str, theirs: str, *, bias: bool = True, layout: str = "same") -> list[Rule]:
    """A Linear, Conv2d or norm: its weight (in ``layout``) and, with ``bias``, its bias (always copied as is)."""
    rules = [Rule(f"{ours}.weight", (f"{theirs}.weight",), layout)]
    return rules + [Rule(f"{ours}.bias", (f"{theirs}.bias",))] if bias else rules


def stack(ours: str, theirs: list[str], sizes: tuple[int, ...], *, bias: bool) -> list[Rule]:
    """Several Hugging Face Linears stacked along the output dimension into one formerkit Linear."""
    rules = [Rule(f"{ours}.weight", tuple(f"{name}.weight" for name in theirs), "stacked", sizes)]
    if bias:
        rules.append(Rule(f"{ours}.bias", tuple(f"{name}.bias" for name in theirs), "stacked", sizes))
    return rules


def permuted(ours: str, theirs: list[str], sizes: tuple[int, ...], order: list[int], *, bias: bool) -> list[Rule]:
    """A formerkit Linear whose output rows are those of the Hugging Face Linear(s) ``theirs`` (stacked) in another
    order: row i of ours is row ``order[i]`` of theirs. Its bias, if any, is reordered the same way."""
    rules = [Rule(f"{ours}.weight", tuple(f"{name}.weight" for name in theirs), "permuted", sizes, tuple(order))]
    if bias:
        rules.append(Rule(f"{ours}.bias", tuple(f"{name}.bias" for name in theirs), "permuted", sizes, tuple(order)))
    return rules


def grouped_qkv_order(kv_heads: int, group: int, head_dim: int) -> list[int]:
    """The row order taking a fused projection laid out per key/value head, [kv_heads, group + 2, head_dim] (each
    group's ``group`` query heads, then its key head, then its value head: Falcon's new decoder architecture; GPT-NeoX
    and Falcon without multi-query are the case group 1, [heads, 3, head_dim]), to formerkit's [q | k | v]."""
    def row(kv_head: int, slot: int, channel: int) -> int:
        return (kv_head * (group + 2) + slot) * head_dim + channel

    queries = [row(kv, q, c) for kv in range(kv_heads) for q in range(group) for c in range(head_dim)]
    keys = [row(kv, group, c) for kv in range(kv_heads) for c in range(head_dim)]
    values = [row(kv, group + 1, c) for kv in range(kv_heads) for c in range(head_dim)]
    return queries + keys + values


def interleaved_rotary_order(heads: int, head_dim: int, rotary_dim: int) -> list[int]:
    """The row order taking query or key projections whose rotary pairs are interleaved, (2i, 2i + 1) (RoFormer,
    GPT-J), to formerkit's half-split pairs (i, i + rotary_dim/2): per head, the even channels of the first
    ``rotary_dim``, then their odd channels, then the unrotated rest. Both rotate pair i by the same angle, and a
    permutation applied to queries and keys alike leaves their dot products unchanged."""
    per_head = [*range(0, rotary_dim, 2), *range(1, rotary_dim, 2), *range(rotary_dim, head_dim)]
    return [head * head_dim + channel for head in range(heads) for channel in per_head]


def lm_head_rules(config: ModelConfig) -> list[Rule]:
    """A decoder's LM head tensors: its bias (``head.bias``: GPT-J, Phi) and its weight, which it has of its own only
    when untied (tied, it is the token embedding)."""
    if config.head.kind != "lm":
        return []
    rules = [Rule("head.projection.bias", ("lm_head.bias",))] if config.head.bias else []
    if not config.head.tie_embeddings:
        rules.append(Rule("head.projection.weight", ("lm_head.weight",)))
    return rules


def check_coverage(rules: list[Rule], params: dict[str, Tensor], architecture: str) -> None:
    """Every formerkit parameter is assigned by exactly one rule (a mismatch is a bug here, not bad input)."""
    counts = Counter(rule.ours for rule in rules)
    repeated = sorted(name for name, count in counts.items() if count > 1)
    unmapped = sorted(set(params) - set(counts))
    unknown = sorted(set(counts) - set(params))
    if repeated or unmapped or unknown:
        raise RuntimeError(f"formerkit.interop: the {architecture} weight rules do not fit the model (assigned twice: "
                           f"{repeated}, unassigned: {unmapped}, not parameters: {unknown}); this is a formerkit bug")


# ----- config helpers shared by families -----


def feedforward_hidden_size(hidden: int | None, width: int) -> int | None:
    """A feed-forward width as formerkit's presets spell it: null when it is the default 4 x width."""
    return None if hidden is None or hidden == 4 * width else hidden


def label_fields(count: int) -> dict[str, Any]:
    """id2label and label2id for ``count`` classes, named as transformers names them by default."""
    names = {str(index): f"LABEL_{index}" for index in range(count)}
    return {"id2label": names, "label2id": {name: int(index) for index, name in names.items()}}


def hf_name(table: dict[str, str], value: str, field: str, architecture: str) -> str:
    """The Hugging Face spelling of a formerkit choice, or an error naming the formerkit field."""
    if value not in table:
        raise InteropError(f"to_hf: {field}: expected one of {', '.join(map(repr, table))} for a {architecture} "
                           f"checkpoint, got {value!r}")
    return table[value]


def windowed_layers(config: ModelConfig) -> list[int]:
    """The layers whose attention is limited to a sliding window."""
    attention = config.attention
    if attention.sliding_window is None:
        return []
    if attention.sliding_window_layers is None:
        return list(range(config.num_layers))
    return sorted(set(attention.sliding_window_layers))


# ----- the family interface -----


class Family:
    """One Hugging Face model family: its config read and written, its weight rules, and the tensors its files may
    hold besides the weights."""

    model_types: tuple[str, ...] = ()
    # The base model's name prefix inside a model with a head ("transformer." in GPT2LMHeadModel). Base models are
    # saved without it; some files of head models are too (the original GPT-2), so reading accepts both.
    prefix = ""
    # Tensors Hugging Face may store that are buffers, not weights (causal-mask tables, RoPE frequencies, position
    # ids); they are ignored on reading, by name. The default pattern never matches.
    buffers = re.compile(r"(?!)")

    def architectures(self, model_type: str) -> dict[str, str]:
        """Hugging Face architecture -> formerkit head kind."""
        raise NotImplementedError

    # (arch, stem.kind, position.kind) of the models ``to_hf`` may write as this family, for the default ``writes``.
    writes_layout: tuple[str, str, str] | None = None

    def writes(self, config: ModelConfig) -> bool:
        """Whether ``to_hf`` writes a model of ``config`` as this family (by its architecture, stem and positions:
        ``writes_layout``, or a test of its own); a family that is only read writes nothing."""
        return self.writes_layout == (config.arch, config.stem.kind, config.position.kind)

    def read_config(self, hf: Fields, architecture: str, has_pooler: bool) -> ModelConfig:
        """The ModelConfig of a checkpoint; ``has_pooler``: the weights hold a pooler (BertModel, ViTModel)."""
        raise NotImplementedError

    def write_config(self, config: ModelConfig) -> dict[str, Any]:
        """A config.json (with "architectures" and "model_type") for a model of this family."""
        raise NotImplementedError

    def rules(self, config: ModelConfig, base: str) -> list[Rule]:
        """The weight rules of a model; ``base`` is the prefix its base-model weights carry ("" or ``prefix``)."""
        raise NotImplementedError

    def tied_copies(self, config: ModelConfig, base: str) -> dict[str, str]:
        """Tensors a file may hold as copies of tied ones (name -> the tensor it must equal); dropped once checked."""
        return {}

    def fixed(self, config: ModelConfig, base: str) -> dict[str, Tensor]:
        """Tensors a file stores that formerkit computes instead of learning (DistilBERT's sinusoidal position table):
        on reading each must equal formerkit's value and is dropped; on writing each is written."""
        return {}

    def unused(self, architecture: str, base: str) -> set[str]:
        """Weights a file of ``architecture`` may hold that the architecture itself never uses (transformers drops
        them on loading too); dropped with a warning naming them."""
        return set()

    def architecture_of(self, hf: Fields) -> str:
        """The class a checkpoint was saved from (config.json's "architectures"), which decides the head."""
        known = self.architectures(hf.model_type)
        value = hf.data.get("architectures")
        if not isinstance(value, list) or len(value) != 1 or value[0] not in known:
            hf.refuse("architectures", f"a list of one of {', '.join(map(repr, known))}",
                      hint="the class the weights were saved from decides the head")
        return value[0]

    def architecture_for(self, config: ModelConfig, model_type: str) -> str:
        """The architecture written for a model of ``config`` as ``model_type``: its head decides."""
        by_head = {kind: architecture for architecture, kind in self.architectures(model_type).items()}
        if config.head.kind not in by_head:
            raise InteropError(f"to_hf: head.kind: expected one of {', '.join(map(repr, by_head))} for a "
                               f"{model_type} checkpoint, got {config.head.kind!r}")
        return by_head[config.head.kind]

    @staticmethod
    def header(config: ModelConfig, architecture: str, model_type: str) -> dict[str, Any]:
        """The fields every written config.json starts with. formerkit knows no special token ids, so none are
        claimed (transformers' defaults could point outside a small vocabulary)."""
        data = {"architectures": [architecture], "model_type": model_type, "initializer_range": config.init_std}
        if config.stem.kind == "tokens":
            data.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
        return data


class Registry:
    """The families formerkit converts, in order: reading picks one by the checkpoint's model_type, writing the first
    whose ``writes`` holds for the model's config."""

    def __init__(self, *families: Family):
        self.families = families
        self.by_model_type: dict[str, Family] = {}
        for family in families:
            for model_type in family.model_types:
                if model_type in self.by_model_type:
                    raise ValueError(f"formerkit.interop: two families read model_type {model_type!r}")
                self.by_model_type[model_type] = family

    def family_of(self, hf: Fields) -> Family:
        """The family of a checkpoint, by its config.json's model_type."""
        family = self.by_model_type.get(hf.model_type) if isinstance(hf.model_type, str) else None
        if family is None:
            hf.refuse("model_type", f"one of {', '.join(map(repr, self.by_model_type))}",
                      hint="formerkit converts these families only")
        return family

    def family_for(self, config: ModelConfig, model_type: str | None = None) -> tuple[Family, dict[str, Any]] | None:
        """The family ``to_hf`` writes a model of ``config`` as, with the config.json it writes, if any.

        Several families may lay out models of one shape (decoders with rotary positions: LLaMA, GPT-NeoX, Phi,
        ...; encoders over tokens: BERT, RoBERTa); each candidate's config.json must read back as ``config``, and the
        first that does is taken. ``model_type`` asks for one family's checkpoint only (RoBERTa rather than BERT).
        When none does, the refusal of the candidate that comes closest is raised: the one whose config.json differs
        in the fewest fields (it names them all), the first in order among equals. A candidate that stopped at the
        first field it cannot spell (an activation it has no name for) is not a complete list, so it comes after
        the complete ones, and what it names is added to the refusal."""
        if model_type is not None and model_type not in self.by_model_type:
            raise InteropError(f"to_hf: model_type: expected one of {', '.join(map(repr, self.by_model_type))} or "
                               f"None, got {model_type!r}")
        refusals: list[InteropError] = []
        for family in self.families:
            if model_type is not None and family is not self.by_model_type[model_type]:
                continue
            if not family.writes(config):
                continue
            try:
                data = family.write_config(config)
                if model_type is not None and data["model_type"] != model_type:
                    raise InteropError(f"to_hf: model_type: {model_type!r} cannot hold this model; it would be "
                                       f"written as {data['model_type']!r}")
                check_round_trip(family, config, data)
            except InteropError as error:
                refusals.append(error)
                continue
            return family, data
        if refusals:
            closest = min(refusals, key=lambda error: (not hasattr(error, "differences"),
                                                      getattr(error, "differences", 0)))
            partial = [str(error).removeprefix("to_hf: ") for error in refusals
                       if error is not closest and not hasattr(error, "differences")]
            if not partial:
                raise closest
            raise InteropError(f"{closest}; and {'; and '.join(partial)}")
        if model_type is not None:
            raise InteropError(f"to_hf: model_type: a {model_type!r} checkpoint cannot hold a model with "
                               f"arch={config.arch!r}, stem.kind={config.stem.kind!r}, "
                               f"position.kind={config.position.kind!r}")
        return None


# ----- checks -----


def _semantics(config: ModelConfig) -> dict[str, Any]:
    """A config's values as dotted names, with defaults resolved and values that change nothing left out, so that
    two spellings of one model compare equal and a difference is one the model would show."""
    flat: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            flat.update({f"{key}.{name}": inner for name, inner in value.items()})
        else:
            flat[key] = value
    flat.update({"attention.num_kv_heads": config.attention.kv_heads, "attention.head_dim": config.head_dim,
                 "attention.sliding_window_layers": windowed_layers(config),
                 "feedforward.hidden_size": config.feedforward_size, "norm.final": config.norm.has_final,
                 "head.pooling": config.head_pooling})
    if config.position.kind == "rope":
        # Fractions that rotate the same channels are one model (GPT-J stores a channel count, not a fraction).
        flat["position.rotary_fraction"] = f"{config.rotary_dim} of {config.head_dim} channels"
    # A mixture of experts differs by feedforward.num_experts (0 and null are both dense); its other fields follow it.
    flat["feedforward.num_experts"] = config.feedforward.num_experts or None
    # Stochastic depth (drop_path) acts in training only: a model's outputs are the same with any rate.
    ignored = ["feedforward.ratio", "feedforward.experts_per_token", "feedforward.capacity_factor",
               "feedforward.aux_loss_weight", "feedforward.moe_layers", "drop_path"]
    if config.position.kind != "rope":
        ignored.append("position.rope_base")
    if config.norm.kind == "rmsnorm":
        ignored.append("norm.bias")
    if config.stem.kind in ("patches", "conv"):
        ignored.append("max_seq_len")
    if config.head.kind not in ("classification", "regression"):
        ignored.append("head.dropout")
    if config.head.kind in ("lm", "masked_lm"):  # these heads never build a pooler
        ignored.append("head.pooler")
    if not config.head.pooler or config.head.kind in ("lm", "masked_lm"):
        ignored.append("head.pooler_activation")
    if not (config.stem.distill_token and config.head.kind == "classification"):
        ignored.append("head.distill_head")
    for name in ignored:
        flat.pop(name)
    return flat


def check_round_trip(family: Family, config: ModelConfig, data: dict[str, Any]) -> None:
    """The config.json about to be written must read back as ``config``; otherwise names every field it cannot
    hold. (A base model is read back with its pooler: BertModel and ViTModel always build one.)"""
    architecture = data["architectures"][0]
    back = family.read_config(Fields(data, f"to_hf ({architecture})"), architecture, has_pooler=True)
    ours, theirs = _semantics(config), _semantics(back)
    differences = [f"{name} is {ours.get(name)!r} (a {architecture} checkpoint holds {theirs.get(name)!r})"
                   for name in sorted(set(ours) | set(theirs)) if ours.get(name) != theirs.get(name)]
    if differences:
        error = InteropError(f"to_hf: this model has no exact {architecture} equivalent: " + "; ".join(differences))
        error.differences = len(differences)  # how far off this family is (``Registry.family_for`` compares)
        raise error


def assign(model: torch.nn.Module, family: Family, architecture: str, base: str, tensors: dict[str, Tensor],
           origins: dict[str, str], directory: Path) -> None:
    """Copies a checkpoint's tensors into ``model`` after checking that every weight the rules need is there, that
    nothing else is (buffers and checked copies of tied weights aside), and that every shape is the config's."""
    config = model.config
    rules = family.rules(config, base)
    params = dict(model.named_parameters())  # a tied weight appears once
    check_coverage(rules, params, architecture)
    remaining = {name: tensor for name, tensor in tensors.items() if not family.buffers.search(name)}
    for name, value in family.fixed(config, base).items():
        if name in remaining:
            # Compared in the file's dtype: a half-precision file holds the table rounded.
            if not torch.equal(remaining[name], value.to(remaining[name].dtype)):
                raise InteropError(f"{directory / origins[name]}: {name} differs from the table {CONFIG_FILE} "
                                   "implies, which formerkit computes itself; refusing to replace it silently")
            del remaining[name]
    for copy, original in family.tied_copies(config, base).items():
        if copy in remaining:
            if original not in remaining or not torch.equal(remaining[copy], remaining[original]):
                raise InteropError(f"{directory / origins[copy]}: {copy} should equal {original}, which it is tied "
                                   "to, but differs (or the latter is absent); refusing to pick one")
            del remaining[copy]
    dropped = sorted(set(remaining) & family.unused(architecture, base))
    if dropped:
        warnings.warn(f"{directory}: dropping {', '.join(dropped)}: weights a {architecture} does not use "
                      "(transformers drops them too)", UserWarning, stacklevel=4)
        for name in dropped:
            del remaining[name]
    needed = [name for rule in rules for name in rule.theirs]
    missing = [name for name in needed if name not in remaining]
    if missing:
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:6])}{', ...' if len(missing) > 6 else ''})"
        raise InteropError(f"{directory}: weight {missing[0]!r} is missing{more if len(missing) > 1 else ''}; a "
                           f"{architecture} with this {CONFIG_FILE} needs it")
    extra = sorted(set(remaining) - set(needed))
    if extra:
        more = f" (and {len(extra) - 1} more: {', '.join(extra[1:6])})" if len(extra) > 1 else ""
        raise InteropError(f"{directory / origins[extra[0]]}: unexpected weight {extra[0]!r}{more}; it is not part "
                           f"of a {architecture} with this {CONFIG_FILE}, and formerkit does not drop weights silently")
    with torch.no_grad():
        for rule in rules:
            param = params[rule.ours]
            parts = [remaining[name] for name in rule.theirs]
            for name, part, shape in zip(rule.theirs, parts, rule.their_shapes(param.shape)):
                if tuple(part.shape) != shape:
                    raise InteropError(f"{directory / origins[name]}: {name} has shape {list(part.shape)}, but "
                                       f"{CONFIG_FILE} implies {list(shape)}")
            param.copy_(rule.to_ours(parts))


def hf_state(model: torch.nn.Module, rules: list[Rule], architecture: str) -> dict[str, Tensor]:
    """The Hugging Face tensors of ``model`` by the rules (fused weights split, transposed, batched): the inverse of
    ``assign``."""
    params = dict(model.named_parameters())
    check_coverage(rules, params, architecture)
    state = {}
    for rule in rules:
        for name, tensor in rule.to_theirs(params[rule.ours].detach()).items():
            # Each tensor gets storage of its own: safetensors refuses tensors sharing memory (q, k, v split from one
            # qkv) and a tied weight is written once, as transformers expects.
            state[name] = tensor.to("cpu").contiguous().clone()
    return state
