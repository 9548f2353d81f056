"""Hugging Face ``transformers`` models as numerical oracles for formerkit's presets.

Each test builds a small random-weight Hugging Face model from a config object (nothing is downloaded), builds the
matching formerkit preset with the same sizes, copies every weight across with the explicit mapping below, and checks
that both compute the same outputs in float32 (max |difference| <= 1e-4).

The weight helpers at the top are the documented correspondence between the two layouts. Each returns a list of
(formerkit parameter name, tensor) pairs; ``load_weights`` then checks that every formerkit parameter is assigned
exactly once, with the right shape, and that every oracle parameter was read (nothing ignored). Two layout facts:

* formerkit fuses attention's query, key and value projections into one ``qkv`` Linear, stacked [q | k | v] along
  the output dimension (with grouped-query attention k and v have ``num_kv_heads * head_dim`` rows each);
* a gated MLP's gate and up projections are one ``fc_in`` Linear, stacked [gate | up] along the output dimension.

Hugging Face GPT-2 uses ``Conv1D``, whose weight is stored [in, out], the transpose of ``nn.Linear``'s [out, in].

Before copying, every oracle parameter is redrawn at random (norm weights around 1, biases around 0, matrices with a
larger spread than the default init) so that a missing bias, a norm without its affine part or an attention pattern
that is nearly uniform cannot hide a difference.
"""

from __future__ import annotations

import collections

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


# ----- weight mapping: Hugging Face -> formerkit -----


class Oracle:
    """The oracle's parameters by name (a tied weight appears once); records which ones were read."""

    def __init__(self, model: torch.nn.Module):
        self.params = dict(model.named_parameters())
        self.read: set[str] = set()

    def __call__(self, name: str) -> Tensor:
        self.read.add(name)
        return self.params[name].detach()

    def unread(self) -> list[str]:
        return sorted(set(self.params) - self.read)


def _linear(fk: str, hf: Oracle, name: str, bias: bool = True) -> list[tuple[str, Tensor]]:
    """An nn.Linear (or LayerNorm) copied as is: weight and, if present, bias."""
    pairs = [(f"{fk}.weight", hf(f"{name}.weight"))]
    return pairs + [(f"{fk}.bias", hf(f"{name}.bias"))] if bias else pairs


def _fused(fk: str, hf: Oracle, names: list[str], bias: bool = True) -> list[tuple[str, Tensor]]:
    """Several nn.Linear stacked along the output dimension into one formerkit Linear."""
    pairs = [(f"{fk}.weight", torch.cat([hf(f"{n}.weight") for n in names], dim=0))]
    if bias:
        pairs.append((f"{fk}.bias", torch.cat([hf(f"{n}.bias") for n in names], dim=0)))
    return pairs


def gpt2_weights(hf: Oracle, num_layers: int) -> list[tuple[str, Tensor]]:
    """GPT2LMHeadModel -> preset "gpt2". Conv1D weights are [in, out]: transposed. c_attn's output columns are already
    [q | k | v]. lm_head.weight is wte.weight in both models (tied), so it is mapped once, as the embedding."""
    pairs = [("stem.tokens.weight", hf("transformer.wte.weight")),
             ("positions.weight", hf("transformer.wpe.weight"))]
    for i in range(num_layers):
        h, f = f"transformer.h.{i}", f"decoder.blocks.{i}"
        pairs += _linear(f"{f}.attention_residual.norm", hf, f"{h}.ln_1")
        pairs += [(f"{f}.attention.qkv.weight", hf(f"{h}.attn.c_attn.weight").t()),
                  (f"{f}.attention.qkv.bias", hf(f"{h}.attn.c_attn.bias")),
                  (f"{f}.attention.out.weight", hf(f"{h}.attn.c_proj.weight").t()),
                  (f"{f}.attention.out.bias", hf(f"{h}.attn.c_proj.bias"))]
        pairs += _linear(f"{f}.feedforward_residual.norm", hf, f"{h}.ln_2")
        pairs += [(f"{f}.feedforward.fc_in.weight", hf(f"{h}.mlp.c_fc.weight").t()),
                  (f"{f}.feedforward.fc_in.bias", hf(f"{h}.mlp.c_fc.bias")),
                  (f"{f}.feedforward.fc_out.weight", hf(f"{h}.mlp.c_proj.weight").t()),
                  (f"{f}.feedforward.fc_out.bias", hf(f"{h}.mlp.c_proj.bias"))]
    return pairs + _linear("decoder.final_norm", hf, "transformer.ln_f")


def llama_weights(hf: Oracle, num_layers: int) -> list[tuple[str, Tensor]]:
    """LlamaForCausalLM -> preset "llama_tiny". No biases; RMSNorm has only a weight; the head is untied.
    qkv = [q_proj | k_proj | v_proj] and fc_in = [gate_proj | up_proj] along the output dimension."""
    pairs = [("stem.tokens.weight", hf("model.embed_tokens.weight"))]
    for i in range(num_layers):
        h, f = f"model.layers.{i}", f"decoder.blocks.{i}"
        pairs += [(f"{f}.attention_residual.norm.weight", hf(f"{h}.input_layernorm.weight"))]
        pairs += _fused(f"{f}.attention.qkv", hf, [f"{h}.self_attn.{p}_proj" for p in "qkv"], bias=False)
        pairs += _linear(f"{f}.attention.out", hf, f"{h}.self_attn.o_proj", bias=False)
        pairs += [(f"{f}.feedforward_residual.norm.weight", hf(f"{h}.post_attention_layernorm.weight"))]
        pairs += _fused(f"{f}.feedforward.fc_in", hf, [f"{h}.mlp.gate_proj", f"{h}.mlp.up_proj"], bias=False)
        pairs += _linear(f"{f}.feedforward.fc_out", hf, f"{h}.mlp.down_proj", bias=False)
    return pairs + [("decoder.final_norm.weight", hf("model.norm.weight")),
                    ("head.projection.weight", hf("lm_head.weight"))]


def bert_weights(hf: Oracle, num_layers: int, prefix: str = "") -> list[tuple[str, Tensor]]:
    """BertModel (``prefix`` "") or the ``bert.`` trunk of BertForMaskedLM -> preset "bert_base" / "bert_base_mlm".
    Post-norm: BERT's attention.output.LayerNorm follows the attention residual, output.LayerNorm the MLP residual."""
    e = f"{prefix}embeddings"
    pairs = [("stem.tokens.weight", hf(f"{e}.word_embeddings.weight")),
             ("stem.token_types.weight", hf(f"{e}.token_type_embeddings.weight")),
             ("positions.weight", hf(f"{e}.position_embeddings.weight"))]
    pairs += _linear("embedding_norm", hf, f"{e}.LayerNorm")
    for i in range(num_layers):
        h, f = f"{prefix}encoder.layer.{i}", f"encoder.blocks.{i}"
        pairs += _fused(f"{f}.attention.qkv", hf, [f"{h}.attention.self.{p}" for p in ("query", "key", "value")])
        pairs += _linear(f"{f}.attention.out", hf, f"{h}.attention.output.dense")
        pairs += _linear(f"{f}.attention_residual.norm", hf, f"{h}.attention.output.LayerNorm")
        pairs += _linear(f"{f}.feedforward.fc_in", hf, f"{h}.intermediate.dense")
        pairs += _linear(f"{f}.feedforward.fc_out", hf, f"{h}.output.dense")
        pairs += _linear(f"{f}.feedforward_residual.norm", hf, f"{h}.output.LayerNorm")
    return pairs


def bert_pooler_weights(hf: Oracle) -> list[tuple[str, Tensor]]:
    """BertModel's pooler (dense + tanh on the first token) -> the "bert_base" head's pooler."""
    return _linear("head.pooler", hf, "pooler.dense")


def bert_mlm_weights(hf: Oracle) -> list[tuple[str, Tensor]]:
    """BertForMaskedLM's cls.predictions -> the "bert_base_mlm" MaskedLMHead. The decoder weight is the word embedding
    in both models (tied); the decoder bias is cls.predictions.bias."""
    p = "cls.predictions"
    return (_linear("head.dense", hf, f"{p}.transform.dense") + _linear("head.norm", hf, f"{p}.transform.LayerNorm")
            + [("head.projection.bias", hf(f"{p}.bias"))])


# ViT's per-layer parameter names: transformers 5.x, then 4.x (whose BERT-style layout nests attention.attention).
_VIT_LAYOUTS = [
    {"layer": "vit.layers.{i}", "q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
     "out": "attention.o_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
    {"layer": "vit.encoder.layer.{i}", "q": "attention.attention.query", "k": "attention.attention.key",
     "v": "attention.attention.value", "out": "attention.output.dense", "fc1": "intermediate.dense",
     "fc2": "output.dense"},
]


def vit_weights(hf: Oracle, num_layers: int) -> list[tuple[str, Tensor]]:
    """ViTForImageClassification -> preset "vit_base_patch16_224". Pre-norm: layernorm_before feeds attention,
    layernorm_after the MLP. The position table [1, tokens, width] loses its leading 1; its first row belongs to the
    class token, as in formerkit."""
    e = "vit.embeddings"
    pairs = [("stem.class_token", hf(f"{e}.cls_token")),
             ("positions.weight", hf(f"{e}.position_embeddings").squeeze(0))]
    pairs += _linear("stem.projection", hf, f"{e}.patch_embeddings.projection")
    names = next(n for n in _VIT_LAYOUTS if n["layer"].format(i=0) + ".layernorm_before.weight" in hf.params)
    for i in range(num_layers):
        h, f = names["layer"].format(i=i), f"encoder.blocks.{i}"
        pairs += _linear(f"{f}.attention_residual.norm", hf, f"{h}.layernorm_before")
        pairs += _fused(f"{f}.attention.qkv", hf, [f"{h}.{names[p]}" for p in "qkv"])
        pairs += _linear(f"{f}.attention.out", hf, f"{h}.{names['out']}")
        pairs += _linear(f"{f}.feedforward_residual.norm", hf, f"{h}.layernorm_after")
        pairs += _linear(f"{f}.feedforward.fc_in", hf, f"{h}.{names['fc1']}")
        pairs += _linear(f"{f}.feedforward.fc_out", hf, f"{h}.{names['fc2']}")
    return pairs + _linear("encoder.final_norm", hf, "vit.layernorm") + _linear("head.projection", hf, "classifier")


# ----- shared machinery -----


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Redraws every parameter: vectors (norm weights, biases) get +-0.1 noise around their init, matrices and tables
    N(0, 0.15^2), enough for sharp attention patterns."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1:
                param.add_(0.1 * noise)
            else:
                param.copy_(0.15 * noise)


def load_weights(model: formerkit.Transformer, pairs: list[tuple[str, Tensor]], hf: Oracle) -> None:
    """Copies ``pairs`` into ``model`` after checking the mapping is complete, one-to-one and shape-exact."""
    counts = collections.Counter(name for name, _ in pairs)
    repeated = sorted(name for name, count in counts.items() if count > 1)
    assert repeated == [], "formerkit parameters assigned more than once"
    params = dict(model.named_parameters())  # a tied weight appears once
    assert sorted(set(params) - set(counts)) == [], "formerkit parameters left unassigned"
    assert sorted(set(counts) - set(params)) == [], "mapped names that are not formerkit parameters"
    assert hf.unread() == [], "oracle parameters the mapping ignores"
    with torch.no_grad():
        for name, value in pairs:
            assert tuple(value.shape) == tuple(params[name].shape), (
                f"{name}: oracle shape {tuple(value.shape)}, formerkit {tuple(params[name].shape)}")
            params[name].copy_(value)


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


def _eval(*models: torch.nn.Module) -> None:
    for model in models:
        model.eval()


# ----- GPT-2 -----


def _gpt2_pair():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=LAYERS, n_embd=WIDTH, n_head=HEADS, vocab_size=VOCAB, n_positions=SEQ,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    hf_model = transformers.GPT2LMHeadModel(config)
    randomize(hf_model, seed=1)
    assert hf_model.lm_head.weight is hf_model.transformer.wte.weight
    fk = formerkit.build_model(formerkit.model_config(
        "gpt2", num_layers=LAYERS, width=WIDTH, num_heads=HEADS, vocab_size=VOCAB, max_seq_len=SEQ))
    assert fk.head.projection.weight is fk.stem.tokens.weight
    hf = Oracle(hf_model)
    load_weights(fk, gpt2_weights(hf, LAYERS), hf)
    _eval(hf_model, fk)
    return hf_model, fk


@torch.no_grad()
def test_gpt2_logits_match():
    hf_model, fk = _gpt2_pair()
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(2))
    diff = max_diff(fk(ids), hf_model(input_ids=ids).logits)
    assert diff <= TOLERANCE, f"GPT-2 logits differ by {diff:.3g}"


# A causal model never lets a real token see right padding, so the left-padded batch is what tests the padding mask.
@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_gpt2_padded_logits_match(side):
    hf_model, fk = _gpt2_pair()
    ids, mask = padded([SEQ, 11, 1, 20], torch.Generator().manual_seed(3), side)
    ours = fk(ids, attention_mask=mask)
    theirs = hf_model(input_ids=ids, attention_mask=mask, position_ids=hf_position_ids(mask)).logits
    real = mask.bool()
    diff = max_diff(ours[real], theirs[real])
    assert diff <= TOLERANCE, f"GPT-2 {side}-padded logits differ by {diff:.3g} at real positions"


# ----- LLaMA -----


def _llama_pair():
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
    randomize(hf_model, seed=1)
    cfg = formerkit.model_config(
        "llama_tiny", num_layers=LAYERS, width=WIDTH, num_heads=HEADS, num_kv_heads=kv_heads, vocab_size=VOCAB,
        max_seq_len=SEQ, rope_base=theta, **{"feedforward.hidden_size": hidden})
    assert cfg.norm.eps == eps, "llama_tiny's RMSNorm eps no longer matches the oracle's rms_norm_eps"
    assert not cfg.head.tie_embeddings
    fk = formerkit.build_model(cfg)
    hf = Oracle(hf_model)
    load_weights(fk, llama_weights(hf, LAYERS), hf)
    _eval(hf_model, fk)
    return hf_model, fk


@torch.no_grad()
def test_llama_logits_match():
    hf_model, fk = _llama_pair()
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(2))
    diff = max_diff(fk(ids), hf_model(input_ids=ids).logits)
    assert diff <= TOLERANCE, f"LLaMA logits differ by {diff:.3g}"


# A causal model never lets a real token see right padding, so the left-padded batch is what tests the padding mask.
@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_llama_padded_logits_match(side):
    hf_model, fk = _llama_pair()
    ids, mask = padded([SEQ, 9, 1, 25], torch.Generator().manual_seed(3), side)
    ours = fk(ids, attention_mask=mask)
    theirs = hf_model(input_ids=ids, attention_mask=mask, position_ids=hf_position_ids(mask)).logits
    real = mask.bool()
    diff = max_diff(ours[real], theirs[real])
    assert diff <= TOLERANCE, f"LLaMA {side}-padded logits differ by {diff:.3g} at real positions"


# ----- BERT -----


def _bert_config():
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
def test_bert_hidden_states_and_pooler_match():
    torch.manual_seed(0)
    hf_model = transformers.BertModel(_bert_config(), add_pooling_layer=True)
    randomize(hf_model, seed=1)
    cfg = formerkit.model_config("bert_base", **_bert_overrides())
    assert cfg.norm.eps == 1e-12, "BERT's LayerNorm eps is 1e-12"
    fk = formerkit.build_model(cfg)
    hf = Oracle(hf_model)
    load_weights(fk, bert_weights(hf, LAYERS) + bert_pooler_weights(hf), hf)
    _eval(hf_model, fk)
    ids, types, mask = _bert_inputs()
    ours = fk(ids, token_type_ids=types, attention_mask=mask, return_outputs=True)
    theirs = hf_model(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    hidden_diff = max_diff(ours.last_hidden_state[real], theirs.last_hidden_state[real])
    pooled_diff = max_diff(ours.pooled, theirs.pooler_output)
    assert hidden_diff <= TOLERANCE, f"BERT last hidden state differs by {hidden_diff:.3g} at real positions"
    assert pooled_diff <= TOLERANCE, f"BERT pooler output differs by {pooled_diff:.3g}"


@torch.no_grad()
def test_bert_masked_lm_logits_match():
    torch.manual_seed(0)
    hf_model = transformers.BertForMaskedLM(_bert_config())
    randomize(hf_model, seed=1)
    assert hf_model.cls.predictions.decoder.weight is hf_model.bert.embeddings.word_embeddings.weight
    fk = formerkit.build_model(formerkit.model_config("bert_base_mlm", **_bert_overrides()))
    assert fk.head.projection.weight is fk.stem.tokens.weight
    hf = Oracle(hf_model)
    load_weights(fk, bert_weights(hf, LAYERS, prefix="bert.") + bert_mlm_weights(hf), hf)
    _eval(hf_model, fk)
    ids, types, mask = _bert_inputs()
    ours = fk(ids, token_type_ids=types, attention_mask=mask)
    theirs = hf_model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
    real = mask.bool()
    diff = max_diff(ours[real], theirs[real])
    assert diff <= TOLERANCE, f"BERT masked-LM logits differ by {diff:.3g} at real positions"


# ----- ViT -----


@torch.no_grad()
def test_vit_logits_and_hidden_states_match():
    torch.manual_seed(0)
    image, patch, classes = 32, 8, 5
    config = transformers.ViTConfig(
        num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=4 * WIDTH,
        image_size=image, patch_size=patch, num_channels=3, num_labels=classes, layer_norm_eps=1e-6,
        hidden_act="gelu", qkv_bias=True, attn_implementation="eager")
    hf_model = transformers.ViTForImageClassification(config)
    randomize(hf_model, seed=1)
    cfg = formerkit.model_config("vit_base_patch16_224", num_layers=LAYERS, width=WIDTH, num_heads=HEADS,
                                 image_size=image, patch_size=patch, num_classes=classes)
    assert cfg.norm.eps == 1e-6, "ViT's LayerNorm eps is 1e-6"
    fk = formerkit.build_model(cfg)
    hf = Oracle(hf_model)
    load_weights(fk, vit_weights(hf, LAYERS), hf)
    _eval(hf_model, fk)
    images = torch.randn(3, 3, image, image, generator=torch.Generator().manual_seed(2))
    ours = fk(images, return_outputs=True)
    logits_diff = max_diff(ours.logits, hf_model(pixel_values=images).logits)
    hidden_diff = max_diff(ours.last_hidden_state, hf_model.vit(pixel_values=images).last_hidden_state)
    assert hidden_diff <= TOLERANCE, f"ViT last hidden state differs by {hidden_diff:.3g}"
    assert logits_diff <= TOLERANCE, f"ViT logits differ by {logits_diff:.3g}"
