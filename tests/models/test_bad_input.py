"""Bad inputs and self-contradicting configs raise formerkit's documented errors, with messages that say what was
expected and what was given.

Tensors: ``InputError``. Configs: ``ConfigError`` (``UnknownFieldError`` for a field that does not exist). All of them
are ``ValueError`` subclasses.
"""

from __future__ import annotations

import re

import pytest
import torch

import formerkit
from formerkit import ModelConfig
from formerkit.errors import CheckpointError, ConfigError, FormerkitError, InputError, UnknownFieldError

VOCAB = 20
MAX_LEN = 8
WIDTH = 32
HEADS = 4


def esc(text: str) -> str:
    return re.escape(text)


def small(**fields) -> ModelConfig:
    base = {"arch": "decoder", "width": WIDTH, "num_layers": 1, "max_seq_len": MAX_LEN,
            "attention": {"num_heads": HEADS}, "stem": {"kind": "tokens", "vocab_size": VOCAB}}
    base.update(fields)
    return ModelConfig.from_dict(base)


@pytest.fixture(scope="module")
def decoder() -> formerkit.Transformer:
    torch.manual_seed(0)
    return formerkit.build_model(small()).eval()


@pytest.fixture(scope="module")
def vit() -> formerkit.Transformer:
    torch.manual_seed(0)
    return formerkit.build_model(small(
        arch="encoder", max_seq_len=None, stem={"kind": "patches", "image_size": 8, "patch_size": 4},
        head={"kind": "classification", "num_classes": 3})).eval()


@pytest.fixture(scope="module")
def seq2seq() -> formerkit.Transformer:
    torch.manual_seed(0)
    return formerkit.build_model(small(arch="encoder_decoder")).eval()


@pytest.fixture()
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))


# ----- the error classes -----


@pytest.mark.parametrize("error", [FormerkitError, ConfigError, UnknownFieldError, InputError, CheckpointError])
def test_every_error_class_is_a_value_error(error):
    assert issubclass(error, ValueError)
    assert issubclass(error, FormerkitError)


def test_errors_are_exported_at_top_level():
    assert formerkit.InputError is InputError and formerkit.ConfigError is ConfigError
    assert formerkit.UnknownFieldError is UnknownFieldError and issubclass(UnknownFieldError, ConfigError)


def test_code_catching_value_error_keeps_working(decoder):
    with pytest.raises(ValueError):
        decoder(torch.tensor([[VOCAB]]))
    with pytest.raises(ValueError):
        small(width=True)


# ----- tensors -----


@pytest.mark.parametrize("bad, low, high", [(-1, -1, 3), (VOCAB, 1, VOCAB), (VOCAB + 100, 1, VOCAB + 100)])
def test_token_ids_outside_the_vocabulary(decoder, bad, low, high):
    with pytest.raises(InputError, match=esc(f"token ids must lie in [0, {VOCAB})") + ".*" +
                       esc(f"got values from {low} to {high}")):
        decoder(torch.tensor([[1, bad, 3]]))


def test_float_token_ids(decoder, ids):
    with pytest.raises(InputError, match=r"integer tensor of token ids.*got dtype torch\.float32"):
        decoder(ids.float())


def test_one_dimensional_input(decoder, ids):
    with pytest.raises(InputError, match=esc("expected shape [batch, tokens], got [5]")):
        decoder(ids[0])


def test_sequence_longer_than_max_seq_len(decoder):
    with pytest.raises(InputError, match=esc(f"{MAX_LEN + 1} tokens") + ".*" + esc(f"max_seq_len ({MAX_LEN})")):
        decoder(torch.zeros(1, MAX_LEN + 1, dtype=torch.long))


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 1, 8, 8), (3, 8, 8)],
                         ids=["wrong-size", "wrong-channels", "three-dims"])
def test_images_of_the_wrong_shape(vit, shape):
    with pytest.raises(InputError, match=esc("expected shape [batch, 3, 8, 8]") + ".*" + esc(f"got {list(shape)}")):
        vit(torch.randn(*shape))


def test_integer_images(vit):
    with pytest.raises(InputError, match=r"floating-point.*got dtype torch\.uint8"):
        vit(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_attention_mask_on_an_image_model(vit):
    with pytest.raises(InputError, match=r"attention_mask: image models take no padding mask"):
        vit(torch.randn(2, 3, 8, 8), attention_mask=torch.ones(2, 4))


@pytest.fixture(scope="module")
def series_model() -> formerkit.Transformer:
    torch.manual_seed(0)
    return formerkit.build_model(small(arch="encoder", max_seq_len=16,
                                       stem={"kind": "linear", "input_dim": 3, "patch_size": 4},
                                       head={"kind": "regression", "output_dim": 2})).eval()


def test_series_with_the_wrong_feature_count(series_model):
    with pytest.raises(InputError, match=esc("expected shape [batch, steps, 3] (input_dim), got [2, 8, 5]")):
        series_model(torch.randn(2, 8, 5))


def test_series_not_a_multiple_of_the_patch_size(series_model):
    with pytest.raises(InputError, match=esc("6 steps is not a multiple of stem.patch_size (4)")):
        series_model(torch.randn(2, 6, 3))


def test_series_longer_than_max_seq_len(series_model):
    with pytest.raises(InputError, match=esc("expected 1 to 16 steps (max_seq_len), got 20")):
        series_model(torch.randn(2, 20, 3))


@pytest.mark.parametrize("length, match", [(-1, "integer >= 0, got -1"), (torch.tensor([1.5, 2.0]), "torch.float32")])
def test_prefix_lm_mask_with_a_bad_length(length, match):
    with pytest.raises(InputError, match=r"PrefixLMMask: prefix_length must be.*" + esc(match)):
        formerkit.PrefixLMMask(length)


def test_prefix_lm_mask_for_another_batch_size(decoder, ids):
    with pytest.raises(InputError, match=r"mask: built for a batch of 3, but the input has a batch of 2"):
        decoder(ids, mask=formerkit.PrefixLMMask(torch.tensor([1, 2, 3])))


def test_attention_mask_of_the_wrong_shape(decoder, ids):
    with pytest.raises(InputError, match=r"attention_mask: expected shape \[2, 5\].*got \[2, 4\]"):
        decoder(ids, attention_mask=torch.ones(2, 4))


def test_attention_mask_with_values_other_than_zero_and_one(decoder, ids):
    mask = torch.tensor([[1, 1, 2, 0, 0], [1, 1, 1, 1, 1]])
    with pytest.raises(InputError, match=r"attention_mask: expected 1 for a token and 0 for padding.*\b2\b"):
        decoder(ids, attention_mask=mask)


def test_decoder_attention_mask_is_checked_too(seq2seq, ids):
    with pytest.raises(InputError, match=r"decoder_attention_mask: expected shape \[2, 5\].*got \[2, 3\]"):
        seq2seq(ids, decoder_input_ids=ids, decoder_attention_mask=torch.ones(2, 3))


def test_mask_tensor_with_wrong_query_key_dims(decoder, ids):
    with pytest.raises(InputError, match=esc("[queries=5, keys=5]") + ".*" + esc("got shape [5, 4]")):
        decoder(ids, mask=torch.ones(5, 4, dtype=torch.bool))


def test_mask_tensor_with_wrong_head_count(decoder, ids):
    with pytest.raises(InputError, match=esc(f"[batch=2, heads={HEADS}, 5, 5]") + ".*" + esc("got [1, 3, 5, 5]")):
        decoder(ids, mask=torch.ones(1, 3, 5, 5, dtype=torch.bool))


def test_mask_tensor_with_wrong_batch(decoder, ids):
    with pytest.raises(InputError, match=r"batch of 3.*batch of 2"):
        decoder(ids, mask=torch.ones(3, 1, 5, 5, dtype=torch.bool))


def test_mask_tensor_of_integer_dtype(decoder, ids):
    with pytest.raises(InputError, match=r"bool or floating-point tensor, got dtype torch\.int64"):
        decoder(ids, mask=torch.ones(5, 5, dtype=torch.long))


def test_token_type_ids_on_a_model_without_token_types(decoder, ids):
    with pytest.raises(InputError, match=r"token_type_ids: .*no token types.*num_token_types is 0"):
        decoder(ids, token_type_ids=torch.zeros_like(ids))


def test_token_type_ids_out_of_range():
    torch.manual_seed(0)
    model = formerkit.build_model(small(arch="encoder", stem={"vocab_size": VOCAB, "num_token_types": 2},
                                        head={"kind": "none"}))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(InputError, match=esc("token_type_ids: must lie in [0, 2)") + ".*" + esc("from 0 to 2")):
        model(ids, token_type_ids=torch.tensor([[0, 1, 2, 0]]))


def test_decoder_input_ids_missing_for_an_encoder_decoder(seq2seq, ids):
    with pytest.raises(InputError, match=r"decoder_input_ids: an encoder_decoder model needs the target tokens"):
        seq2seq(ids)


def test_decoder_input_ids_on_a_decoder(decoder, ids):
    with pytest.raises(InputError, match=r"decoder_input_ids: only an encoder_decoder.*'decoder'"):
        decoder(ids, decoder_input_ids=ids)


@pytest.mark.parametrize("bad, low, high", [(MAX_LEN, 0, MAX_LEN), (-1, -1, 4)])
def test_position_ids_out_of_range(decoder, ids, bad, low, high):
    positions = torch.arange(5).repeat(2, 1)
    positions[0, 4 if bad >= 0 else 0] = bad
    with pytest.raises(InputError, match=esc(f"position_ids: must lie in [0, {MAX_LEN})") + ".*" +
                       esc(f"got values from {low} to {high}")):
        decoder(ids, position_ids=positions)


def test_position_ids_of_the_wrong_shape(decoder, ids):
    with pytest.raises(InputError, match=r"position_ids: expected shape \[2, 5\].*got \[2, 4\]"):
        decoder(ids, position_ids=torch.arange(4).repeat(2, 1))


# ----- configs that contradict themselves -----


def test_width_not_divisible_by_num_heads():
    with pytest.raises(ConfigError, match=r"attention\.num_heads: expected a divisor of width \(64\), got 3"):
        small(width=64, attention={"num_heads": 3})


def test_num_kv_heads_not_dividing_num_heads():
    with pytest.raises(ConfigError, match=r"attention\.num_kv_heads: expected a divisor of attention\.num_heads "
                                          r"\(8\), got 3"):
        small(attention={"num_heads": 8, "num_kv_heads": 3})


def test_sliding_window_layers_without_a_window():
    with pytest.raises(ConfigError, match=r"attention\.sliding_window_layers: .*got \(0,\).*"
                                          r"a window on a model without one"):
        small(attention={"num_heads": HEADS, "sliding_window_layers": [0]})


def test_sliding_window_layer_index_out_of_range():
    with pytest.raises(ConfigError, match=r"attention\.sliding_window_layers: expected layer indices in \[0, 1\)"):
        small(attention={"num_heads": HEADS, "sliding_window": 2, "sliding_window_layers": [3]})


def test_lm_head_on_an_encoder():
    with pytest.raises(ConfigError, match=r"head\.kind: expected a tokens stem with arch 'decoder' or "
                                          r"'encoder_decoder', got 'lm'.*masked_lm"):
        small(arch="encoder", head={"kind": "lm"})


def test_num_classes_on_an_lm_head():
    with pytest.raises(ConfigError, match=r"head\.num_classes: expected null unless head\.kind is "
                                          r"'classification', got 10"):
        small(head={"kind": "lm", "num_classes": 10})


@pytest.mark.parametrize("make, field, suggestion", [
    (lambda: ModelConfig.from_dict({"widht": 64}), "widht", "width"),
    (lambda: ModelConfig.from_dict({"attention": {"num_head": 4}}), "attention.num_head", "attention.num_heads"),
    (lambda: ModelConfig().replace(widht=64), "widht", "width"),
    (lambda: ModelConfig().replace(num_head=4), "num_head", "attention.num_heads"),
    (lambda: ModelConfig().replace(**{"attention.num_head": 4}), "attention.num_head", "attention.num_heads"),
], ids=["top-level", "nested", "replace", "replace-section-field", "replace-dotted"])
def test_unknown_fields_suggest_the_closest_name(make, field, suggestion):
    with pytest.raises(UnknownFieldError, match=esc(f"unknown config field {field!r}") + ".*" +
                       esc(f"did you mean {suggestion!r}")) as caught:
        make()
    assert caught.value.suggestion == suggestion
    assert isinstance(caught.value, ConfigError)


def test_unknown_field_without_a_close_match_lists_the_known_fields():
    with pytest.raises(UnknownFieldError, match=r"unknown config field 'zzzz'.*Known fields here: .*num_layers") as e:
        ModelConfig.from_dict({"zzzz": 1})
    assert e.value.suggestion is None
    assert "did you mean" not in str(e.value)


@pytest.mark.parametrize("field, value, expected", [
    ("num_layers", "4", "an integer"),
    ("width", True, "an integer"),
    ("dropout", "0.1", "a number"),
    ("layer_scale", False, "a number or null"),
])
def test_wrong_types(field, value, expected):
    with pytest.raises(ConfigError, match=esc(f"{field}: expected {expected}, got {value!r}")):
        small(**{field: value})


def test_wrong_type_inside_a_section():
    with pytest.raises(ConfigError, match=esc("attention.qk_norm: expected true or false, got 1")):
        small(attention={"num_heads": HEADS, "qk_norm": 1})


@pytest.mark.parametrize("section, field, value, suggestion", [
    ("position", "kind", "rotary", None),
    ("position", "kind", "sinusiodal", "sinusoidal"),
    ("norm", "placement", "postt", "post"),
    ("feedforward", "activation", "swiglue", "swiglu"),
])
def test_values_outside_the_choices_name_the_allowed_values(section, field, value, suggestion):
    allowed = {
        ("position", "kind"): ("learned", "sinusoidal", "rope", "alibi", "sincos2d", "none"),
        ("norm", "placement"): ("pre", "post", "sandwich"),
        ("feedforward", "activation"): ("gelu", "gelu_tanh", "relu", "squared_relu", "silu", "swiglu", "geglu"),
    }[section, field]
    with pytest.raises(ConfigError, match=esc(f"{section}.{field}: expected one of ")) as caught:
        small(**{section: {field: value}})
    message = str(caught.value)
    assert f"got {value!r}" in message
    for name in allowed:
        assert repr(name) in message
    if suggestion is not None:
        assert f"did you mean {suggestion!r}" in message


def test_rope_with_an_odd_head_dim():
    # width 24 over 8 heads: head_dim 3
    with pytest.raises(ConfigError, match=r"attention\.head_dim: expected an even head width for rope.*got 3"):
        small(width=24, attention={"num_heads": 8}, position={"kind": "rope"})


@pytest.mark.parametrize("stem, field, value", [
    ({"kind": "tokens", "vocab_size": VOCAB}, "patch_size", 4),
    ({"kind": "tokens", "vocab_size": VOCAB}, "image_size", [8, 8]),
    ({"kind": "tokens", "vocab_size": VOCAB}, "class_token", True),
    ({"kind": "patches", "image_size": 8, "patch_size": 4}, "input_dim", 3),
    ({"kind": "patches", "image_size": 8, "patch_size": 4}, "conv_layers", 2),
    ({"kind": "linear", "input_dim": 3}, "register_tokens", 1),
])
def test_stem_fields_set_for_the_wrong_stem_kind(stem, field, value):
    with pytest.raises(ConfigError, match=esc(f"stem.{field}: expected its default") + ".*" +
                       esc(f"stem.kind={stem['kind']!r}") + ".*" + esc(f"stem.{field} applies only to")):
        ModelConfig.from_dict({"stem": {**stem, field: value}})


def test_patch_size_is_allowed_on_a_linear_stem():
    config = small(arch="encoder", stem={"kind": "linear", "input_dim": 3, "patch_size": 4}, head={"kind": "none"})
    assert config.stem.patch_size == 4


@pytest.mark.parametrize("fields, depths", [
    ({"num_layers": 4, "num_unique_layers": 3}, "4"),
    ({"arch": "encoder_decoder", "num_layers": 4, "num_decoder_layers": 6, "num_unique_layers": 4}, "4 and 6"),
])
def test_num_unique_layers_not_dividing_the_depth(fields, depths):
    unique = fields["num_unique_layers"]
    with pytest.raises(ConfigError, match=esc(f"num_unique_layers: expected a divisor of the depth ({depths}), "
                                              f"got {unique}")):
        small(**fields)


@pytest.mark.parametrize("fields, path, value", [
    ({"dropout": 1.0}, "dropout", 1.0),
    ({"drop_path": 1.5}, "drop_path", 1.5),
    ({"attention": {"num_heads": HEADS, "dropout": 1.0}}, "attention.dropout", 1.0),
    ({"feedforward": {"dropout": 2.0}}, "feedforward.dropout", 2.0),
    ({"dropout": -0.1}, "dropout", -0.1),
])
def test_dropout_outside_zero_one(fields, path, value):
    with pytest.raises(ConfigError, match=esc(f"{path}: expected a probability in [0, 1), got {value!r}")):
        small(**fields)


def test_config_errors_carry_the_field_and_value():
    with pytest.raises(ConfigError) as caught:
        small(num_layers=0)
    assert caught.value.field == "num_layers" and caught.value.value == 0
    assert "num_layers: expected an integer >= 1, got 0" in str(caught.value)
