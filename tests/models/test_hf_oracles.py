"""Hugging Face ``transformers`` models as numerical oracles for formerkit's presets.

Each test builds a small random-weight Hugging Face model from a config object (nothing is downloaded), saves it to a
temporary directory and reads it with ``formerkit.from_hf``, whose weight mapping (one module per family in
formerkit/interop/) is the documented correspondence between the two layouts: it checks that every weight is used
exactly once with the right shape and that nothing is left over. The test then checks that the model read is the
matching preset itself (the same ModelConfig, sizes overridden) and that both compute the same outputs in float32
(max |difference| <= 1e-4).

Before saving, every oracle parameter is redrawn at random (the ``randomize`` fixture) so that a missing bias, a norm
without its affine part or an attention pattern that is nearly uniform cannot hide a difference.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

transformers = pytest.importorskip("transformers")

import formerkit  # noqa: E402

TOLERANCE = 1e-4
VOCAB = 97
WIDTH = 64
HEADS = 4
LAYERS = 2
SEQ = 32


def from_oracle(hf_model: torch.nn.Module, directory, randomize, preset: str, **overrides) -> formerkit.Transformer:
    """Randomizes the oracle, saves it as a local checkpoint, reads it back with formerkit.from_hf and checks that
    the result is ``preset`` with ``overrides``. Both models are left in eval mode."""
    randomize(hf_model, seed=1)
    hf_model.save_pretrained(directory, safe_serialization=True)
    fk = formerkit.from_hf(directory)
    assert fk.config == formerkit.model_config(preset, **overrides), f"the oracle does not read as preset {preset!r}"
    hf_model.eval()
    return fk


def max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def padded(lengths: list[int], generator: torch.Generator, side: str = "right") -> tuple[Tensor, Tensor]:
    """Random token ids [batch, SEQ] and a 0/1 mask with ``lengths[i]`` real tokens in row i, padding on ``side``;
    padded positions hold random tokens, which must not matter."""
    ids = torch.randint(0, VOCAB, (len(lengths), SEQ), generator=generator)
    real = torch.arange(SEQ).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return ids, (real if side == "right" else real.flip(1)).long()


def hf_position_ids(mask: Tensor) -> Tensor:
    """Positions counting real tokens only (what ``generate`` passes for a left-padded batch, and formerkit's default
    with an attention_mask); Hugging Face's forward otherwise numbers every slot, padding included."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


# ----- GPT-2 -----


def _gpt2_pair(directory, randomize):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=LAYERS, n_embd=WIDTH, n_head=HEADS, vocab_size=VOCAB, n_positions=SEQ,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    hf_model = transformers.GPT2LMHeadModel(config)
    assert hf_model.lm_head.weight is hf_model.transformer.wte.weight
    # GPT-2's published dropout rates (0.1 on residuals, embeddings and attention) are the oracle's defaults.
    fk = from_oracle(hf_model, directory, randomize, "gpt2", num_layers=LAYERS, width=WIDTH, num_heads=HEADS,
                     vocab_size=VOCAB, max_seq_len=SEQ, dropout=0.1, **{"attention.dropout": 0.1})
    assert fk.head.projection.weight is fk.stem.tokens.weight
    return hf_model, fk


@torch.no_grad()
def test_gpt2_logits_match(tmp_path, randomize):
    hf_model, fk = _gpt2_pair(tmp_path, randomize)
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(2))
    diff = max_diff(fk(ids), hf_model(input_ids=ids).logits)
    assert diff <= TOLERANCE, f"GPT-2 logits differ by {diff:.3g}"


# A causal model never lets a real token see right padding, so the left-padded batch is what tests the padding mask.
@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_gpt2_padded_logits_match(side, tmp_path, randomize):
    hf_model, fk = _gpt2_pair(tmp_path, randomize)
    ids, mask = padded([SEQ, 11, 1, 20], torch.Generator().manual_seed(3), side)
    ours = fk(ids, attention_mask=mask)
    theirs = hf_model(input_ids=ids, attention_mask=mask, position_ids=hf_position_ids(mask)).logits
    real = mask.bool()
    diff = max_diff(ours[real], theirs[real])
    assert diff <= TOLERANCE, f"GPT-2 {side}-padded logits differ by {diff:.3g} at real positions"


# ----- LLaMA -----


def _llama_pair(directory, randomize):
    torch.manual_seed(0)
    kv_heads, hidden, theta, eps = 2, 96, 50000.0, 1e-5
    config = transformers.LlamaConfig(
        num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, num_key_value_heads=kv_heads,
        intermediate_size=hidden, vocab_size=VOCAB, max_position_embeddings=SEQ, rms_norm_eps=eps,
        rope_theta=theta, attention_bias=False, mlp_bias=False, tie_word_embeddings=False, attn_implementation="eager")
    hf_model = transformers.LlamaForCausalLM(config)
    head_dim = WIDTH // HEADS
    expected = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    assert torch.allclose(hf_model.model.rotary_emb.inv_freq, expected), "the oracle ignored rope_theta"
    # llama_tiny's RMSNorm eps (1e-5) and untied head are the oracle's; only sizes and rope_base are overridden.
    fk = from_oracle(hf_model, directory, randomize, "llama_tiny", num_layers=LAYERS, width=WIDTH, num_heads=HEADS,
                     num_kv_heads=kv_heads, vocab_size=VOCAB, max_seq_len=SEQ, rope_base=theta,
                     **{"feedforward.hidden_size": hidden})
    return hf_model, fk


@torch.no_grad()
def test_llama_logits_match(tmp_path, randomize):
    hf_model, fk = _llama_pair(tmp_path, randomize)
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(2))
    diff = max_diff(fk(ids), hf_model(input_ids=ids).logits)
    assert diff <= TOLERANCE, f"LLaMA logits differ by {diff:.3g}"


# A causal model never lets a real token see right padding, so the left-padded batch is what tests the padding mask.
@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_llama_padded_logits_match(side, tmp_path, randomize):
    hf_model, fk = _llama_pair(tmp_path, randomize)
    ids, mask = padded([SEQ, 9, 1, 25], torch.Generator().manual_seed(3), side)
    ours = fk(ids, attention_mask=mask)
    theirs = hf_model(input_ids=ids, attention_mask=mask, position_ids=hf_position_ids(mask)).logits
    real = mask.bool()
    diff = max_diff(ours[real], theirs[real])
    assert diff <= TOLERANCE, f"LLaMA {side}-padded logits differ by {diff:.3g} at real positions"


# ----- BERT -----


def _bert_config():
    # BERT-base's own layer_norm_eps (1e-12), activation and dropout rates, which the bert_base presets share.
    return transformers.BertConfig(
        num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=4 * WIDTH,
        vocab_size=VOCAB, max_position_embeddings=SEQ, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu",
        attn_implementation="eager")


def _bert_overrides():
    return dict(num_layers=LAYERS, width=WIDTH, num_heads=HEADS, vocab_size=VOCAB, max_seq_len=SEQ)


def _bert_inputs():
    generator = torch.Generator().manual_seed(2)
    lengths = [SEQ, 13, 2, 27]
    ids, mask = padded(lengths, generator)
    types = torch.randint(0, 2, ids.shape, generator=generator)
    return ids, types, mask


@torch.no_grad()
def test_bert_hidden_states_and_pooler_match(tmp_path, randomize):
    torch.manual_seed(0)
    hf_model = transformers.BertModel(_bert_config(), add_pooling_layer=True)
    fk = from_oracle(hf_model, tmp_path, randomize, "bert_base", **_bert_overrides())
    ids, types, mask = _bert_inputs()
    ours = fk(ids, token_type_ids=types, attention_mask=mask, return_outputs=True)
    theirs = hf_model(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    hidden_diff = max_diff(ours.last_hidden_state[real], theirs.last_hidden_state[real])
    pooled_diff = max_diff(ours.pooled, theirs.pooler_output)
    assert hidden_diff <= TOLERANCE, f"BERT last hidden state differs by {hidden_diff:.3g} at real positions"
    assert pooled_diff <= TOLERANCE, f"BERT pooler output differs by {pooled_diff:.3g}"


@torch.no_grad()
def test_bert_masked_lm_logits_match(tmp_path, randomize):
    torch.manual_seed(0)
    hf_model = transformers.BertForMaskedLM(_bert_config())
    assert hf_model.cls.predictions.decoder.weight is hf_model.bert.embeddings.word_embeddings.weight
    fk = from_oracle(hf_model, tmp_path, randomize, "bert_base_mlm", **_bert_overrides())
    assert fk.head.projection.weight is fk.stem.tokens.weight
    ids, types, mask = _bert_inputs()
    ours = fk(ids, token_type_ids=types, attention_mask=mask)
    theirs = hf_model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
    real = mask.bool()
    diff = max_diff(ours[real], theirs[real])
    assert diff <= TOLERANCE, f"BERT masked-LM logits differ by {diff:.3g} at real positions"


# ----- ViT -----


@torch.no_grad()
def test_vit_logits_and_hidden_states_match(tmp_path, randomize):
    torch.manual_seed(0)
    image, patch, classes = 32, 8, 5
    config = transformers.ViTConfig(
        num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=4 * WIDTH,
        image_size=image, patch_size=patch, num_channels=3, num_labels=classes, layer_norm_eps=1e-6,
        hidden_act="gelu", qkv_bias=True, attn_implementation="eager")
    hf_model = transformers.ViTForImageClassification(config)
    # The preset's LayerNorm eps (1e-6) is the published ViT's, set on the oracle above.
    fk = from_oracle(hf_model, tmp_path, randomize, "vit_base_patch16_224", num_layers=LAYERS, width=WIDTH,
                     num_heads=HEADS, image_size=image, patch_size=patch, num_classes=classes)
    images = torch.randn(3, 3, image, image, generator=torch.Generator().manual_seed(2))
    ours = fk(images, return_outputs=True)
    logits_diff = max_diff(ours.logits, hf_model(pixel_values=images).logits)
    hidden_diff = max_diff(ours.last_hidden_state, hf_model.vit(pixel_values=images).last_hidden_state)
    assert hidden_diff <= TOLERANCE, f"ViT last hidden state differs by {hidden_diff:.3g}"
    assert logits_diff <= TOLERANCE, f"ViT logits differ by {logits_diff:.3g}"
