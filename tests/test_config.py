"""ModelConfig: validation, dict/JSON/YAML round trips, replace()."""

from __future__ import annotations

import dataclasses
import json

import pytest

import formerkit
from formerkit import ConfigError, ModelConfig, UnknownFieldError
from formerkit.config import AttentionConfig, StemConfig


def small(**overrides) -> ModelConfig:
    base = ModelConfig(arch="decoder", width=32, num_layers=2, max_seq_len=16, attention={"num_heads": 4},
                       stem={"vocab_size": 20})
    return base.replace(**overrides) if overrides else base


def test_default_config_is_valid_and_frozen():
    config = ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.width = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", formerkit.list_models())
def test_every_preset_round_trips_through_dict_json_and_yaml(name, tmp_path):
    config = formerkit.model_config(name)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_dict(json.loads(config.to_json())) == config
    config.to_yaml(tmp_path / "c.yaml")
    config.to_json(tmp_path / "c.json")
    assert ModelConfig.from_file(tmp_path / "c.yaml") == config
    assert ModelConfig.from_file(tmp_path / "c.json") == config
    # The dict is plain data: JSON of the dict of the reloaded config is the same text.
    assert ModelConfig.from_file(tmp_path / "c.json").to_json() == config.to_json()


def test_from_file_reads_a_saved_models_config_json(tmp_path):
    config = formerkit.model_config("char_gpt").replace(num_layers=1, width=32)
    formerkit.save(formerkit.build_model(config), tmp_path / "model", extra={"note": 1})
    assert ModelConfig.from_file(tmp_path / "model" / "config.json") == config


def test_partial_dict_fills_defaults_and_int_image_size_becomes_a_pair():
    config = ModelConfig.from_dict({"arch": "encoder", "width": 64, "attention": {"num_heads": 4},
                                    "stem": {"kind": "patches", "image_size": 32, "patch_size": 8},
                                    "head": {"kind": "classification", "num_classes": 3}})
    assert config.stem.image_size == (32, 32)
    assert config.num_layers == ModelConfig().num_layers
    assert config.head_pooling == "mean"  # no class token
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_floats_accept_integers_and_are_stored_as_floats():
    config = small(position={"kind": "rope", "rope_base": 500000})
    assert isinstance(config.position.rope_base, float)
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_unknown_field_suggests_the_closest_name():
    with pytest.raises(UnknownFieldError, match="did you mean 'width'"):
        ModelConfig.from_dict({"widht": 64})
    with pytest.raises(UnknownFieldError, match="did you mean 'attention.num_heads'"):
        ModelConfig.from_dict({"attention": {"num_head": 4}})


def test_errors_name_field_value_and_what_is_allowed():
    with pytest.raises(ConfigError) as info:
        small(attention={"num_heads": 5})
    assert info.value.field == "attention.num_heads"
    assert info.value.value == 5
    assert "divisor of width (32)" in str(info.value)
    with pytest.raises(ConfigError, match=r"norm.kind: expected one of 'layernorm', 'rmsnorm', got 'rms'"):
        small(norm={"kind": "rms"})
    with pytest.raises(ConfigError, match="did you mean 'rope'"):
        small(position={"kind": "rop"})
    with pytest.raises(ConfigError, match="num_layers: expected an integer, got '4'"):
        ModelConfig.from_dict({"num_layers": "4"})
    with pytest.raises(ConfigError, match="width: expected an integer, got True"):
        ModelConfig.from_dict({"width": True})


def test_sections_validate_on_their_own():
    with pytest.raises(ConfigError, match="attention.num_kv_heads"):
        AttentionConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ConfigError, match="stem.vocab_size"):
        StemConfig(kind="tokens")
    with pytest.raises(ConfigError, match="applies only to stem.kind"):
        StemConfig(kind="patches", image_size=32, patch_size=8, vocab_size=10)


def test_replace_accepts_top_level_sections_dotted_paths_and_unique_section_fields():
    config = small()
    assert config.replace(width=64).width == 64
    assert config.replace(attention={"num_kv_heads": 2}).attention.num_heads == 4  # merged, not replaced
    assert config.replace(**{"attention.num_kv_heads": 1}).attention.kv_heads == 1
    assert config.replace(vocab_size=99).stem.vocab_size == 99
    assert config.replace(dropout=0.1).dropout == 0.1  # a top-level field wins over section fields of that name
    with pytest.raises(UnknownFieldError, match="did you mean 'attention.num_heads'"):
        config.replace(**{"attention.num_head": 2})


def test_replace_reports_ambiguous_section_fields():
    with pytest.raises(ConfigError, match="exists in feedforward.bias, norm.bias"):
        small().replace(bias=False)


def test_config_file_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="an existing .json, .yaml or .yml file"):
        ModelConfig.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="a valid JSON or YAML document"):
        ModelConfig.from_file(bad)


def test_unknown_keyword_to_a_constructor_gets_the_same_suggestion():
    with pytest.raises(UnknownFieldError, match="did you mean 'width'"):
        ModelConfig(widht=64)
    with pytest.raises(UnknownFieldError, match="did you mean 'attention.num_heads'"):
        AttentionConfig(num_head=4)


def test_names_from_other_libraries_point_to_ours():
    with pytest.raises(ConfigError, match="did you mean 'rope'"):
        small(position={"kind": "rotary"})
    with pytest.raises(ConfigError, match="did you mean 'gelu_tanh'"):
        small(feedforward={"activation": "gelu_new"})


def test_yaml_numbers_with_an_exponent_but_no_point_are_numbers(tmp_path):
    from formerkit.schema import load_yaml

    assert load_yaml("lr: 1e-3\nsteps: 2E4\nname: 1e3x\nrate: 2.5e-4") == {"lr": 1e-3, "steps": 2e4,
                                                                              "name": "1e3x", "rate": 2.5e-4}
    path = tmp_path / "model.yaml"
    path.write_text("width: 32\nattention: {num_heads: 4, dropout: 1e-1}\nmax_seq_len: 8\n"
                    "stem: {kind: tokens, vocab_size: 11}\n")
    assert ModelConfig.from_file(path).attention.dropout == 0.1


def test_an_unknown_choice_of_an_optional_field_is_a_config_error_not_a_key_error():
    # pooling accepts None; an unknown name must not be looked up as if it were another library's alias of None.
    with pytest.raises(ConfigError, match="head.pooling") as error:
        ModelConfig(head={"kind": "classification", "num_classes": 3, "pooling": "max"})
    assert "'max'" in str(error.value) and "'mean'" in str(error.value)


@pytest.mark.parametrize("overrides, field", [
    ({"position": {"kind": "learned", "rotary_fraction": 0.5}}, "position.rotary_fraction"),
    ({"position": {"kind": "rope", "rotary_fraction": 0.1}}, "position.rotary_fraction"),  # 0 channels of 8
    ({"position": {"kind": "rope", "rope_factor": 4.0}}, "position.rope_factor"),  # no scaling scheme
    ({"position": {"kind": "rope", "rope_scaling": "llama3", "rope_factor": 8.0}}, "position.rope_original_max_len"),
    ({"position": {"kind": "rope", "rope_scaling": "linear", "rope_factor": 2.0, "rope_beta_fast": 8.0}},
     "position.rope_beta_fast"),  # a yarn field under linear scaling
    ({"position": {"kind": "rope", "rope_local_base": 1e4}}, "position.rope_local_base"),  # no window
    ({"position": {"kind": "rope", "rope_scaling": "yarn", "rope_factor": 2.0, "rope_original_max_len": 8,
                   "rope_short_factors": [1.0] * 4}}, "position.rope_short_factors"),  # a longrope field under yarn
    ({"position": {"kind": "rope", "rope_scaling": "longrope", "rope_factor": 2.0, "rope_original_max_len": 8,
                   "rope_short_factors": [1.0] * 4}}, "position.rope_long_factors"),  # missing
    ({"position": {"kind": "rope", "rope_scaling": "longrope", "rope_factor": 2.0, "rope_original_max_len": 8,
                   "rope_short_factors": [1.0] * 3, "rope_long_factors": [2.0] * 4}},
     "position.rope_short_factors"),  # one per rotated pair: 4
    ({"position": {"kind": "rope", "rope_scaling": "dynamic", "rope_factor": 2.0, "rope_original_max_len": 8,
                   "rotary_fraction": 0.25}}, "position.rope_scaling"),  # base ** (r / (r - 2)) with r = 2
    ({"position": {"kind": "alibi", "relative_buckets": 8}}, "position.relative_buckets"),
    ({"norm": {"kind": "layernorm", "weight_offset": 1.0}}, "norm.weight_offset"),
    ({"attention": {"num_heads": 4, "softcap": 0.0}}, "attention.softcap"),
    ({"head": {"kind": "none", "logit_softcap": 30.0}}, "head.logit_softcap"),
    ({"parallel_residual": "shared_norm", "norm": {"placement": "post"}}, "parallel_residual"),
])
def test_checkpoint_family_fields_are_refused_where_they_would_do_nothing_or_cannot_hold(overrides, field):
    with pytest.raises(ConfigError) as error:
        small(**overrides)
    assert error.value.field == field


def test_checkpoint_family_fields_accept_what_the_families_use():
    config = small(position={"kind": "rope", "rotary_fraction": 0.5, "rope_scaling": "yarn", "rope_factor": 4.0,
                             "rope_original_max_len": 8, "rope_beta_fast": 16.0},
                   parallel_residual="separate_norms", norm={"kind": "rmsnorm", "weight_offset": 1.0},
                   attention={"num_heads": 4, "softcap": 50.0, "scale": 0.25}, head={"logit_softcap": 30.0})
    assert config.rotary_dim == 4
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_attention_softcap_is_refused_with_l2_attention():
    # L2 attention's scores drop each query's own |q|^2, which a cap (not shift-invariant) would not ignore.
    with pytest.raises(ConfigError, match="attention.softcap: expected null with attention.kind 'l2'"):
        AttentionConfig(kind="l2", softcap=5.0)
    assert AttentionConfig(kind="linear", kind_layers=(0,), softcap=5.0).softcap == 5.0  # the softmax layers cap
