"""RoPE in Hugging Face configs, read and written: the base (``rope_theta``), the partial-rotary fraction and the
scaling schemes (``rope_scaling`` in transformers 4.x, ``rope_parameters`` in 5.x) as formerkit's position fields."""

from __future__ import annotations

import math
from typing import Any

from formerkit.config import ModelConfig
from formerkit.interop.files import Fields

__all__ = ["ROPE_TYPES", "rope_base", "rope_fields", "rope_position", "rotary_fraction"]


def _rope_type(spec: Any) -> Any:
    return spec.get("rope_type", spec.get("type", "default")) if isinstance(spec, dict) else spec


def rope_base(hf: Fields, *, partial: bool = False) -> float:
    """RoPE's base (``rope_theta``), after checking that no scaling scheme is asked for. transformers 4.x writes
    ``rope_theta`` and ``rope_scaling``; 5.x writes both into ``rope_parameters``. A family that reads partial rotary
    (``rotary_fraction``) passes ``partial``; the others refuse a partial_rotary_factor other than 1. (Families whose
    scaled checkpoints formerkit reproduces read them with ``rope_position`` instead.)"""
    why = ("formerkit reads plain RoPE for this family; a scaled variant (linear, dynamic, yarn, longrope, llama3) "
           "changes the rotation angles")
    theta: Any = hf.number("rope_theta", 10000.0)
    scaling = hf.value("rope_scaling", None)
    if scaling is not None and _rope_type(scaling) != "default":
        hf.fail("rope_scaling", "null or a rope_type of 'default'", scaling, hint=why)
    parameters = hf.value("rope_parameters", None)
    if parameters is not None:
        if not isinstance(parameters, dict) or any(isinstance(value, dict) for value in parameters.values()):
            hf.fail("rope_parameters", "one mapping with rope_type and rope_theta", parameters,
                    hint="per-layer-type RoPE settings are not supported")
        if _rope_type(parameters) != "default":
            hf.fail("rope_parameters.rope_type", "'default'", _rope_type(parameters), hint=why)
        if not partial and parameters.get("partial_rotary_factor", 1.0) != 1.0:
            hf.fail("rope_parameters.partial_rotary_factor", "1.0 (every channel rotated)",
                    parameters["partial_rotary_factor"])
        theta = parameters.get("rope_theta", theta)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)):
            hf.fail("rope_parameters.rope_theta", "a number", theta)
    if not partial and hf.value("partial_rotary_factor", 1.0) != 1.0:
        hf.fail("partial_rotary_factor", "1.0 (every channel rotated)", hf.value("partial_rotary_factor"))
    return float(theta)


def rotary_fraction(hf: Fields, name: str, default: float) -> float:
    """The fraction of each head's channels RoPE rotates: ``rope_parameters.partial_rotary_factor`` (transformers
    5.x) or the family's own field ``name`` (4.x: GPT-NeoX's rotary_pct, Phi's partial_rotary_factor)."""
    parameters = hf.value("rope_parameters", None)
    if isinstance(parameters, dict) and "partial_rotary_factor" in parameters:
        value = parameters["partial_rotary_factor"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            hf.fail("rope_parameters.partial_rotary_factor", "a fraction in (0, 1]", value)
        return float(value)
    value = hf.number(name, default)
    if not 0 < value <= 1:
        hf.fail(name, "a fraction in (0, 1]", value)
    return value


def _rope_number(hf: Fields, spec: dict, where: str, name: str, default: Any = None) -> float:
    value = spec.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if name in spec:
            hf.fail(f"{where}.{name}", "a number", value)
        hf.fail(f"{where}.{name}", "a number")  # says the field is missing
    return float(value)


# The rope_type values formerkit reproduces in any LLaMA-style class. LongRoPE is left to the classes whose
# generation recomputes the cache when its long factors take over, as formerkit's does (Phi-3): LLaMA's keeps the
# keys rotated by the short factors, which formerkit does not reproduce.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def rope_position(hf: Fields, max_seq_len: int, *, kinds: tuple[str, ...] = ROPE_TYPES,
                  aliases: dict[str, str] | None = None, original_default: Any = None) -> tuple[dict[str, Any], int]:
    """formerkit's position section of a rotary checkpoint, and the model's max_seq_len, read as transformers 5
    reads them: ``rope_scaling`` (4.x) if set, else ``rope_parameters`` (5.x), with ``rope_theta`` and
    ``partial_rotary_factor`` beside them. Scaling schemes: linear, dynamic, yarn and llama3 (``rope_frequencies``)
    by default, or ``kinds`` (those of a class that reads others, such as Phi-3's longrope; ``aliases``: its other
    names for them); per-layer-type settings are refused by field.

    ``max_seq_len`` is the config's max_position_embeddings. llama3, yarn and longrope take the original length from
    ``original_max_position_embeddings``: top-level first, as transformers does, then the scaling dict's, else
    max_position_embeddings; a config class declaring the top-level field (Phi-3) passes its default as
    ``original_default``, which then wins over the dict's. dynamic treats max_position_embeddings itself as the
    original length and has no limit of its own; formerkit's model then allows factor times that many positions."""
    scaling = hf.value("rope_scaling", None)
    where, spec = ("rope_scaling", scaling) if scaling else ("rope_parameters", hf.value("rope_parameters", None))
    spec = spec or {}
    if not isinstance(spec, dict) or any(isinstance(value, dict) for value in spec.values()):
        hf.fail(where, "one mapping with rope_type and rope_theta", spec,
                hint="per-layer-type RoPE settings are not supported")
    kind = spec.get("rope_type", spec.get("type", "default"))
    field = f"{where}.rope_type" if "rope_type" in spec or "type" not in spec else f"{where}.type"
    kind = (aliases or {}).get(kind, kind)
    if kind not in kinds:
        hf.fail(field, "one of " + ", ".join(map(repr, kinds)), kind,
                hint="the RoPE scaling schemes formerkit reproduces for this model class")
    theta = _rope_number(hf, spec, where, "rope_theta", hf.number("rope_theta", 10000.0))
    fraction = spec.get("partial_rotary_factor", hf.value("partial_rotary_factor", 1.0))
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        hf.fail("partial_rotary_factor", "a fraction in (0, 1]", fraction)
    position: dict[str, Any] = {"kind": "rope", "rope_base": theta}
    if fraction != 1:
        position["rotary_fraction"] = float(fraction)
    if kind == "default":
        return position, max_seq_len
    position["rope_scaling"] = kind
    if kind in ("llama3", "yarn", "longrope"):
        top = "original_max_position_embeddings" in hf.data or original_default is not None
        original = hf.value("original_max_position_embeddings", original_default) if top else spec.get(
            "original_max_position_embeddings", max_seq_len)
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            hf.fail("original_max_position_embeddings" if top else f"{where}.original_max_position_embeddings",
                    "an integer >= 1", original)
        position["rope_original_max_len"] = original
    if kind in ("yarn", "longrope") and spec.get("factor") is None:
        # transformers' fallback: the ratio of the two lengths
        position["rope_factor"] = max_seq_len / position["rope_original_max_len"]
    else:
        position["rope_factor"] = _rope_number(hf, spec, where, "factor")
    if kind == "dynamic":
        position["rope_original_max_len"] = max_seq_len
        return position, int(max_seq_len * position["rope_factor"])
    if kind == "longrope":
        for name in ("short_factor", "long_factor"):
            factors = spec.get(name)
            if not isinstance(factors, list) or not all(
                    isinstance(value, (int, float)) and not isinstance(value, bool) for value in factors):
                hf.fail(f"{where}.{name}", "a list of numbers, one per rotated channel pair", factors)
            position[f"rope_{name}s"] = tuple(float(value) for value in factors)
        if spec.get("attention_factor") is not None:
            position["rope_attention_factor"] = _rope_number(hf, spec, where, "attention_factor")
    if kind == "llama3":
        position["rope_low_freq_factor"] = _rope_number(hf, spec, where, "low_freq_factor")
        position["rope_high_freq_factor"] = _rope_number(hf, spec, where, "high_freq_factor")
    if kind == "yarn":
        if spec.get("truncate", True) is not True:
            hf.fail(f"{where}.truncate", "true (the ramp's bounds rounded outwards)", spec["truncate"],
                    hint="formerkit implements YaRN's rounded correction range only")
        # transformers' defaults: 32 and 1 (also for 0 or null).
        position["rope_beta_fast"] = float(_rope_number(hf, spec, where, "beta_fast", 32.0) or 32.0)
        position["rope_beta_slow"] = float(_rope_number(hf, spec, where, "beta_slow", 1.0) or 1.0)
        factor, mscale, mscale_all_dim = position["rope_factor"], spec.get("mscale"), spec.get("mscale_all_dim")
        if spec.get("attention_factor") is not None:
            position["rope_attention_factor"] = _rope_number(hf, spec, where, "attention_factor")
        elif mscale and mscale_all_dim:
            # DeepSeek's spelling of the table scale: (0.1 mscale ln s + 1) / (0.1 mscale_all_dim ln s + 1).
            def scale(m: float) -> float:
                return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0

            position["rope_attention_factor"] = scale(_rope_number(hf, spec, where, "mscale")) / scale(
                _rope_number(hf, spec, where, "mscale_all_dim"))
    return position, max_seq_len


def rope_fields(config: ModelConfig) -> dict[str, Any]:
    """The config.json fields of a rotary model's positions, as transformers 5 reads them (``rope_parameters``),
    with 4.x's ``rope_theta`` and ``rope_scaling`` beside them; the inverse of ``rope_position``. Also returns
    max_position_embeddings: for dynamic scaling the original length (see ``rope_position``)."""
    position = config.position
    parameters: dict[str, Any] = {"rope_type": position.rope_scaling or "default", "rope_theta": position.rope_base}
    data: dict[str, Any] = {"rope_theta": position.rope_base, "max_position_embeddings": config.max_seq_len}
    if position.rotary_fraction != 1.0:
        data["partial_rotary_factor"] = parameters["partial_rotary_factor"] = position.rotary_fraction
    if position.rope_scaling is not None:
        parameters["factor"] = position.rope_factor
        if position.rope_scaling == "dynamic":
            data["max_position_embeddings"] = position.rope_original_max_len
        elif position.rope_scaling != "linear":
            parameters["original_max_position_embeddings"] = position.rope_original_max_len
        if position.rope_scaling == "llama3":
            parameters.update(low_freq_factor=position.rope_low_freq_factor,
                              high_freq_factor=position.rope_high_freq_factor)
        if position.rope_scaling == "yarn":
            parameters.update(beta_fast=position.rope_beta_fast, beta_slow=position.rope_beta_slow)
            if position.rope_attention_factor is not None:
                parameters["attention_factor"] = position.rope_attention_factor
        if position.rope_scaling == "longrope":
            parameters.update(short_factor=list(position.rope_short_factors),
                              long_factor=list(position.rope_long_factors))
            if position.rope_attention_factor is not None:
                parameters["attention_factor"] = position.rope_attention_factor
            # Phi-3's config class reads the original length from the top level only.
            data["original_max_position_embeddings"] = position.rope_original_max_len
        data["rope_scaling"] = dict(parameters)
    data["rope_parameters"] = parameters
    return data
