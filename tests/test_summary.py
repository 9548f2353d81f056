"""summarize(): parameters per part, FLOPs and activation memory, checked against counts done by hand."""

from __future__ import annotations

import torch

import formerkit


def test_parts_add_up_to_the_model_and_name_the_core_parts():
    config = formerkit.model_config("gpt2")
    summary = formerkit.summarize(config, batch=1, seq_len=8)
    parts = dict(summary.parts)
    assert summary.total_parameters == 124_439_808
    assert parts["embedding"] == 50257 * 768
    assert parts["positions"] == 1024 * 768
    assert parts["decoder attention"] == 12 * (768 * 3 * 768 + 3 * 768 + 768 * 768 + 768)
    assert parts["decoder feed-forward"] == 12 * (2 * 768 * 3072 + 3072 + 768)


def test_flops_per_token_match_a_hand_count():
    width, layers, vocab, length, heads = 64, 2, 100, 16, 4
    config = formerkit.ModelConfig(arch="decoder", width=width, num_layers=layers, max_seq_len=length,
                                   attention={"num_heads": heads}, stem={"vocab_size": vocab},
                                   feedforward={"ratio": 4})
    summary = formerkit.summarize(config, batch=3, seq_len=length)
    # Per token: 2 FLOPs per weight of every matmul, plus QK^T and AV (2 * length * width each).
    matmul_weights = layers * (4 * width * width + 2 * 4 * width * width) + width * vocab
    expected = 2 * matmul_weights + layers * 2 * (2 * length * width)
    assert summary.flops_per_unit == expected
    assert summary.unit == "token"


def test_activation_memory_grows_linearly_with_batch():
    config = formerkit.model_config("char_gpt", num_layers=2)
    one = formerkit.summarize(config, batch=1, seq_len=64).activation_bytes
    four = formerkit.summarize(config, batch=4, seq_len=64).activation_bytes
    assert one > 0
    assert four == 4 * one


def test_image_models_report_per_image():
    summary = formerkit.summarize(formerkit.model_config("vit_base_patch16_224"))
    assert summary.unit == "image"
    # ViT-B/16 at 224: about 17.6 GMACs, i.e. about 35 GFLOPs per image.
    assert 34e9 < summary.flops_per_unit < 36e9
    assert "per image" in summary.format()


def test_models_with_score_biases_and_per_stack_positions_are_summarized():
    # ALiBi and T5's relative bias add to the scores through the mask, which a shape-only (meta) run builds too; a
    # T5-like encoder-decoder's two relative tables count as positions.
    alibi = formerkit.ModelConfig(width=32, num_layers=1, max_seq_len=16, attention={"num_heads": 4},
                                  position={"kind": "alibi"}, stem={"kind": "tokens", "vocab_size": 20})
    assert formerkit.summarize(alibi, batch=1, seq_len=8).total_parameters > 0
    t5 = formerkit.ModelConfig(arch="encoder_decoder", width=32, num_layers=1, max_seq_len=16,
                               attention={"num_heads": 4},
                               position={"kind": "relative", "relative_buckets": 8, "separate_decoder": True},
                               stem={"kind": "tokens", "vocab_size": 20})
    summary = formerkit.summarize(t5, batch=1, seq_len=8)
    assert dict(summary.parts)["positions"] == 2 * 8 * 4


def test_an_adapted_model_shows_trainable_and_frozen_parameters_and_their_training_memory():
    """LoRA on q and v of every layer: rank x (in + out) per projection trains, the rest is frozen; the training
    memory counts a gradient and two AdamW moments for the trainable parameters only."""
    config = formerkit.model_config("char_gpt").replace(num_layers=2, width=32, num_heads=2, max_seq_len=16)
    torch.manual_seed(0)
    model = formerkit.add_adapters(formerkit.build_model(config), method="lora", targets=("q", "v"), rank=4)
    summary = formerkit.summarize(model, seq_len=16)
    lora = 2 * 2 * 4 * (32 + 32)  # layers x (q, v) x rank x (in + out)
    plain = formerkit.build_model(config).num_parameters()
    assert summary.trainable == lora and summary.total_parameters == plain + lora
    assert summary.adapters == {"default": lora}
    assert summary.training_bytes == 4 * (plain + lora) + 12 * lora + summary.activation_bytes
    assert f"trainable parameters: {lora:,}" in summary.format()
    # the same from a config and the adapt: arguments (a recipe's section), and a whole model trains everything
    adapt = {"method": "lora", "targets": ["q", "v"], "rank": 4}
    assert formerkit.summarize(config, seq_len=16, adapt=adapt).trainable == lora
    whole = formerkit.summarize(config, seq_len=16)
    assert whole.trainable == whole.total_parameters
    assert whole.training_bytes == 16 * whole.total_parameters + whole.activation_bytes
    # partial tuning (requires_grad set by hand): the same parameters count as trainable
    partial = formerkit.build_model(config)
    for name, parameter in partial.named_parameters():
        parameter.requires_grad_(name.startswith("head") or "norm" in name)
    expected = sum(p.numel() for p in partial.parameters() if p.requires_grad)
    assert formerkit.summarize(partial, seq_len=16).trainable == expected
