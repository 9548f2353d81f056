"""LoRA and DoRA adapters in Hugging Face PEFT's layout (formerkit.adapt.peft), against ``peft`` itself: an adapter
saved by formerkit and loaded by ``peft.PeftModel.from_pretrained`` onto the transformers model gives formerkit's
logits, and a random PEFT adapter (non-zero B) saved by peft and loaded by formerkit gives peft's logits."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import formerkit  # noqa: E402
from formerkit.adapt import adapter_names, use_adapter  # noqa: E402
from formerkit.errors import InteropError  # noqa: E402

from ..conftest import randomize_weights, token_config  # noqa: E402

# transformers 5.25 warns about its own deprecated name while peft loads an adapter: nothing the test can act on.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

VOCAB = 61
TOLERANCE = 1e-5


def llama_config(**attention):
    """A tiny LLaMA (RMSNorm, RoPE, SwiGLU, grouped-query attention, untied head) as formerkit spells it."""
    return token_config(vocab_size=VOCAB, width=32, num_layers=3, num_heads=4, max_seq_len=32,
                        attention={"num_kv_heads": 2, "qkv_bias": False, "out_bias": False, **attention},
                        feedforward={"activation": "swiglu", "hidden_size": 48, "bias": False}, position="rope",
                        norm={"kind": "rmsnorm", "eps": 1e-5})


def randomize_adapters(model, seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".adapters." in name:
                noise = 0.2 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                # A and B drawn afresh (independent of the global generator that drew A); magnitudes perturbed
                if name.endswith("magnitude"):
                    parameter.add_(noise)
                else:
                    parameter.copy_(noise)


def tokens():
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))


def peft_logits(hf_model, directory, ids):
    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(hf_model, directory).eval()
        return adapted(input_ids=ids).logits


@pytest.mark.parametrize(("method", "targets", "layers", "rslora"), [
    ("lora", ("q", "k", "v", "out", "gate", "fc_in", "fc_out"), None, False),
    ("lora", ("q", "v"), [0, 2], True),
    ("dora", ("k", "out", "fc_in"), None, False),
])
def test_formerkit_adapters_saved_as_peft_give_peft_the_same_logits(tmp_path, method, targets, layers, rslora):
    model = randomize_weights(formerkit.build_model(llama_config()), 0, std="fan_in").eval()
    formerkit.to_hf(model, tmp_path / "hf")
    formerkit.add_adapters(model, method=method, targets=targets, rank=4, alpha=8, layers=layers, rslora=rslora)
    randomize_adapters(model)
    ids = tokens()
    with torch.no_grad():
        ours = model(ids)
    formerkit.save_adapters(model, tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] == (method == "dora") and config["use_rslora"] == rslora
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        base = hf_model(input_ids=ids).logits
    theirs = peft_logits(hf_model, tmp_path / "peft", ids)
    assert (base - theirs).abs().max() > 1e-2  # the adapter does change the outputs
    assert (ours - theirs).abs().max() <= TOLERANCE


@pytest.mark.parametrize(("fields", "formerkit_targets"), [
    ({"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
     ["q", "k", "v", "out", "fc_in", "gate", "fc_out"]),
    ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "use_rslora": True}, ["q", "v"]),
    ({"target_modules": ["v_proj", "down_proj"], "use_dora": True}, ["v", "fc_out"]),
])
def test_peft_adapters_load_into_formerkit_with_peft_logits(tmp_path, fields, formerkit_targets):
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    # init_lora_weights=False: B random too, so the adapter changes the outputs
    adapted = peft.get_peft_model(hf_model, peft.LoraConfig(r=4, lora_alpha=12, init_lora_weights=False, **fields))
    if fields.get("use_dora"):  # perturb the magnitudes away from ||W + s B A||
        with torch.no_grad():
            for name, parameter in adapted.named_parameters():
                if "lora_magnitude_vector" in name:
                    parameter.mul_(1.5)
    adapted.save_pretrained(tmp_path / "peft")
    ids = tokens()
    with torch.no_grad():
        theirs = adapted.eval()(input_ids=ids).logits
    model = formerkit.from_hf(tmp_path / "hf")
    with torch.no_grad():
        base = model(ids)
    formerkit.load_adapters(model, tmp_path / "peft")
    record = model.adapter_records["default"]
    assert record["targets"] == formerkit_targets
    assert record["layers"] == fields.get("layers_to_transform")
    assert record["method"] == ("dora" if fields.get("use_dora") else "lora")
    with torch.no_grad():
        ours = model(ids)
    assert (ours - base).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= TOLERANCE
    # and back out: formerkit's PEFT file of the loaded adapter holds peft's tensors
    formerkit.save_adapters(model, tmp_path / "again", format="peft")
    from safetensors.torch import load_file
    original, written = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(
        tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(original) == sorted(written)
    assert all(torch.equal(original[key], written[key]) for key in original)


def test_two_peft_adapters_on_one_base_switch_per_call(tmp_path):
    model = randomize_weights(formerkit.build_model(llama_config()), 0, std="fan_in").eval()
    ids = tokens()
    outputs = {}
    for name, targets in (("a", ("q",)), ("b", ("fc_out",))):
        formerkit.add_adapters(model, targets=targets, rank=2, name=name)
        randomize_adapters(model, seed=len(outputs))
        formerkit.save_adapters(model, tmp_path / name, format="peft", name=name)
        with torch.no_grad():
            outputs[name] = model(ids)
    fresh = randomize_weights(formerkit.build_model(llama_config()), 0, std="fan_in").eval()
    formerkit.load_adapters(fresh, tmp_path / "a", name="a")
    formerkit.load_adapters(fresh, tmp_path / "b", name="b")
    assert adapter_names(fresh) == ["a", "b"]
    with torch.no_grad():
        for name in ("a", "b"):
            with use_adapter(fresh, name):
                assert (fresh(ids) - outputs[name]).abs().max() <= TOLERANCE


def test_targets_without_a_peft_equivalent_are_refused(tmp_path):
    # GPT-2 keeps q, k and v in one Conv1D (c_attn): a LoRA on q alone has no PEFT module of its own.
    gpt2 = formerkit.build_model(token_config(vocab_size=VOCAB, width=16, num_layers=1, num_heads=2))
    formerkit.add_adapters(gpt2, targets=("q",), rank=2)
    with pytest.raises(InteropError, match=r"target 'q' at decoder\.blocks\.0\.attention\.qkv has no PEFT "
                                           r"equivalent: a GPT2LMHeadModel does not keep those rows"):
        formerkit.save_adapters(gpt2, tmp_path / "gpt2", format="peft")
    # A model no Hugging Face family holds (ALiBi) has no PEFT layout at all.
    alibi = formerkit.build_model(token_config(vocab_size=VOCAB, width=16, num_layers=1, num_heads=2,
                                               position="alibi"))
    formerkit.add_adapters(alibi, rank=2)
    with pytest.raises(InteropError, match="to_hf cannot write this model"):
        formerkit.save_adapters(alibi, tmp_path / "alibi", format="peft")


def test_peft_directories_formerkit_cannot_reproduce_are_refused_by_field(tmp_path):
    model = randomize_weights(formerkit.build_model(llama_config()), 0, std="fan_in").eval()
    formerkit.add_adapters(model, targets=("q",), rank=2)
    formerkit.save_adapters(model, tmp_path / "ok", format="peft")
    base = randomize_weights(formerkit.build_model(llama_config()), 0, std="fan_in").eval()
    config_path = tmp_path / "ok" / "adapter_config.json"
    good = json.loads(config_path.read_text())
    for field, value, message in (("peft_type", "IA3", "peft_type: expected 'LORA'"),
                                  ("bias", "all", "bias: expected 'none'"),
                                  ("modules_to_save", ["lm_head"], "modules_to_save"),
                                  ("rank_pattern", {"q_proj": 4}, "one rank and one alpha")):
        config_path.write_text(json.dumps({**good, field: value}))
        with pytest.raises(InteropError, match=message):
            formerkit.load_adapters(base, tmp_path / "ok")
        assert adapter_names(base) == []


def test_greedy_generation_with_a_peft_adapter_matches_peft(tmp_path):
    torch.manual_seed(1)
    hf_config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    adapted = peft.get_peft_model(hf_model, peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                            target_modules=["q_proj", "v_proj", "up_proj"])).eval()
    adapted.save_pretrained(tmp_path / "peft")
    model = formerkit.load_adapters(formerkit.from_hf(tmp_path / "hf"), tmp_path / "peft")
    prompts = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompts)
    mask[1, :3] = 0  # left padding of different lengths
    mask[2, :6] = 0
    prompts = prompts.masked_fill(mask == 0, 0)
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = adapted.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=16, min_new_tokens=16,
                                    do_sample=False, pad_token_id=0)
    got = model.generate(prompts, 16, attention_mask=mask, temperature=0)
    assert torch.equal(got, expected)
    bare = formerkit.from_hf(tmp_path / "hf").generate(prompts, 16, attention_mask=mask, temperature=0)
    assert not torch.equal(bare, got)  # the adapter changes what is generated


@pytest.mark.parametrize(("architecture", "config_class", "fields", "targets"), [
    # BERT: "dense" names three Linears per layer (and the MLM head's), so target_modules are written in full.
    ("BertForMaskedLM", "BertConfig", {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
                                       "num_attention_heads": 4, "intermediate_size": 40,
                                       "max_position_embeddings": 32}, ("q", "v", "out", "fc_in", "fc_out")),
    # T5: self-attention in both stacks and the decoder's cross-attention.
    ("T5ForConditionalGeneration", "T5Config", {"vocab_size": VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 40,
                                                "num_layers": 2, "num_heads": 4, "decoder_start_token_id": 0},
     ("q", "v", "cross_q", "cross_k", "cross_out", "fc_out")),
])
def test_peft_layout_of_other_families_round_trips_through_peft(tmp_path, architecture, config_class, fields,
                                                                 targets):
    torch.manual_seed(0)
    hf_model = getattr(transformers, architecture)(getattr(transformers, config_class)(**fields)).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    ids = tokens()
    inputs = {"input_ids": ids, **({"decoder_input_ids": ids} if "T5" in architecture else {})}
    with torch.no_grad():
        base = hf_model(**inputs).logits
    model = formerkit.from_hf(tmp_path / "hf")
    formerkit.add_adapters(model, targets=targets, rank=2)
    randomize_adapters(model)
    with torch.no_grad():
        ours = model(ids, **({"decoder_input_ids": ids} if "T5" in architecture else {}))
    formerkit.save_adapters(model, tmp_path / "peft", format="peft")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf_model, tmp_path / "peft").eval()(**inputs).logits
    assert (theirs - base).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= TOLERANCE
    again = formerkit.load_adapters(formerkit.from_hf(tmp_path / "hf"), tmp_path / "peft")
    assert again.adapter_records["default"]["targets"] == list(targets)


def test_gpt2_conv1d_adapters_both_ways(tmp_path):
    """GPT-2 keeps q, k and v in one Conv1D, c_attn: formerkit's target qkv (one adapter over the fused projection)
    is PEFT's LoRA on c_attn, written and read with fan_in_fan_out (PEFT's flag for Conv1D weights)."""
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    ids = tokens()
    # peft -> formerkit
    adapted = peft.get_peft_model(hf_model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                            target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    adapted.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = adapted.eval()(input_ids=ids).logits
    model = formerkit.load_adapters(formerkit.from_hf(tmp_path / "hf"), tmp_path / "peft")
    assert model.adapter_records["default"]["targets"] == ["qkv", "fc_in"]
    with torch.no_grad():
        assert (model(ids) - theirs).abs().max() <= TOLERANCE
    # formerkit -> peft
    model = formerkit.from_hf(tmp_path / "hf")
    formerkit.add_adapters(model, targets=("qkv", "out", "fc_out"), rank=2, layers=[1])
    randomize_adapters(model)
    formerkit.save_adapters(model, tmp_path / "ours", format="peft")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with torch.no_grad():
        ours = model(ids)
        hf_again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
        theirs = peft.PeftModel.from_pretrained(hf_again, tmp_path / "ours").eval()(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= TOLERANCE
