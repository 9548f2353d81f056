"""Hugging Face checkpoints in and out, from local files only.

``from_hf(directory)`` reads a ``transformers`` checkpoint directory (``config.json`` with ``model.safetensors``, or a
sharded ``model.safetensors.index.json`` and its shards) into a formerkit ``Transformer`` with the same outputs.
``to_hf(model, directory)`` writes a formerkit model as such a directory, which ``transformers``' ``from_pretrained``
loads with no missing or unexpected weights and the same outputs. ``convert`` is the function behind the command line.

Families: the ``FAMILIES`` registry below, one line each with the ``model_type`` values it reads (the README's table
lists them with what each refuses). Each
family is one module of this package defining a ``Family`` (``formerkit.interop.engine``): the Hugging Face config
read into a ModelConfig, a ModelConfig written back as one, and one table of weight rules that serves both directions.
``FAMILIES`` below lists them: adding a family is adding its module, its entry there and its name in the refusals
of ``_family_for``.

Faithfulness comes first. A config value formerkit does not reproduce, a missing weight or an unexpected one is an
``InteropError`` naming the field or the tensor, never a silent approximation. ``to_hf`` checks its own work the same
way: the config.json it writes must read back as the model's own config, or it names the fields that differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from formerkit.checkpoint import load, load_extra, save
from formerkit.config import ModelConfig
from formerkit.data.tokenizers import Tokenizer, load_tokenizer, save_tokenizer
from formerkit.errors import ConfigError, InteropError
from formerkit.interop.bart import Bart
from formerkit.interop.bert import Bert
from formerkit.interop.deit import DeiT
from formerkit.interop.distilbert import DistilBert
from formerkit.interop.engine import Family, Registry, assign, hf_state
from formerkit.interop.falcon import Falcon
from formerkit.interop.files import WeightFiles, read_hf_config, write_hf_files
from formerkit.interop.gemma import Gemma
from formerkit.interop.gpt2 import GPT2
from formerkit.interop.gpt_neox import GPTNeoX
from formerkit.interop.gptj import GPTJ
from formerkit.interop.llama import Llama
from formerkit.interop.opt import OPT
from formerkit.interop.phi import Phi
from formerkit.interop.phi3 import Phi3
from formerkit.interop.roberta import Roberta
from formerkit.interop.t5 import T5
from formerkit.interop.tokenizers import (
    generation_config_for,
    read_generation_config,
    read_hf_tokenizer,
    write_generation_config,
    write_hf_tokenizer,
)
from formerkit.interop.vit import ViT
from formerkit.models.transformer import build_model

__all__ = ["convert", "from_hf", "imported_record", "to_hf"]

# The families formerkit converts. Writing takes the first whose ``writes`` holds for the model's config and whose
# config.json reads back as it: GPT-2 before OPT, LLaMA before Phi-3 (partial rotary, LongRoPE) and the parallel-block
# decoders, BERT before RoBERTa and DistilBERT, ViT before DeiT, so that a model the older family holds is written as
# before; the later one takes what only it holds (OPT: no biases, post-norm, no final norm; GPT-NeoX, Phi, GPT-J,
# Falcon: parallel blocks, partial rotary, LayerNorm decoders; Gemma: offset norm scales and scaled embeddings; RoBERTa:
# a masked-LM head under a non-GELU MLP; DistilBERT: no token types, a ReLU pooler; DeiT: the distillation token; T5:
# relative positions, in an encoder-decoder or an encoder alone; BART: an encoder-decoder with learned positions).
# ``to_hf(..., model_type=)`` asks for one family.
FAMILIES = Registry(
    GPT2(),  # gpt2
    Llama(),  # llama, mistral, qwen2, qwen3
    Phi3(),  # phi3
    OPT(),  # opt
    GPTNeoX(),  # gpt_neox (Pythia)
    Phi(),  # phi
    GPTJ(),  # gptj
    Falcon(),  # falcon
    Gemma(),  # gemma, gemma2, gemma3_text (a multimodal gemma3 is refused, pointing to its text model)
    Bert(),  # bert
    Roberta(),  # roberta
    DistilBert(),  # distilbert
    ViT(),  # vit
    DeiT(),  # deit
    T5(),  # t5
    Bart(),  # bart
)


def _family_for(config: ModelConfig, model_type: str | None = None) -> tuple[Family, dict[str, Any]]:
    """The family whose checkpoints hold a model of ``config`` exactly and the config.json it writes, or a refusal
    naming what no family writes."""
    found = FAMILIES.family_for(config, model_type)
    if found is not None:
        return found
    arch, stem, position = config.arch, config.stem.kind, config.position.kind
    if arch == "decoder" and stem == "tokens":
        raise InteropError(f"to_hf: position.kind: expected 'learned' (GPT-2, OPT) or 'rope' (LLaMA, Mistral, Qwen2, "
                           f"Qwen3, Phi-3, GPT-NeoX, Phi, GPT-J, Falcon, Gemma) for a decoder over tokens, got "
                           f"{position!r}")
    if arch == "encoder_decoder" and stem == "tokens":
        raise InteropError(f"to_hf: position.kind: expected 'relative' (T5) or 'learned' (BART) for an "
                           f"encoder_decoder, got {position!r}")
    raise InteropError(f"to_hf: no Hugging Face family formerkit writes has arch={arch!r} with stem.kind={stem!r}; "
                       "supported: a decoder over tokens (GPT-2, OPT, LLaMA, GPT-NeoX, Phi, GPT-J, Falcon, Gemma), an "
                       "encoder over tokens (BERT, RoBERTa, DistilBERT, T5's encoder), an encoder over patches (ViT, "
                       "DeiT), an encoder_decoder over tokens (T5, BART)")


# ----- from Hugging Face -----


def _read_hf(directory: str | Path, trust_pickle: bool) -> tuple[torch.nn.Module, str, str]:
    """The model of a checkpoint directory, its model_type and its architecture."""
    directory = Path(directory)
    hf = read_hf_config(directory)
    family = FAMILIES.family_of(hf)
    architecture = family.architecture_of(hf)
    tensors, origins = WeightFiles(directory, trust_pickle).load()
    has_pooler = any(name.endswith("pooler.dense.weight") for name in tensors)
    try:
        config = family.read_config(hf, architecture, has_pooler)
    except ConfigError as error:
        raise InteropError(f"{hf.source}: describes a model formerkit cannot build: {error}") from error
    model = build_model(config)
    base = family.prefix if any(name.startswith(family.prefix) for name in tensors) else ""
    assign(model, family, architecture, base, tensors, origins, directory)
    return model.eval(), hf.model_type, architecture


def from_hf(directory: str | Path, *, trust_pickle: bool = False) -> torch.nn.Module:
    """Reads a local Hugging Face checkpoint directory into a formerkit Transformer with the same outputs.

    The directory holds ``config.json`` and ``model.safetensors`` (or ``model.safetensors.index.json`` with its shards).
    ``config.json``'s ``model_type`` picks the family (see ``FAMILIES``: gpt2, llama, mistral, qwen2, qwen3, phi3, opt,
    gpt_neox, phi, gptj, falcon, gemma, gemma2, gemma3_text, bert, roberta, distilbert, vit, deit, t5, bart, ...) and
    its ``architectures`` the head (e.g. BertForMaskedLM: the masked-LM head; BertModel: the pooler, if the weights hold
    one; DeiTForImageClassificationWithTeacher: the class and distillation heads; T5EncoderModel: T5's encoder alone).
    An encoder-decoder (t5, bart) keeps the checkpoint's decoder_start_token_id, which ``generate`` starts the target
    from. A pickled ``pytorch_model.bin`` is refused unless ``trust_pickle`` is true (pickle can run code); then it is
    read with ``torch.load(weights_only=True)`` and a warning says so.

    The model comes back in eval mode, like transformers' ``from_pretrained``, with float32 weights whatever the
    checkpoint's dtype. Raises ``InteropError`` naming the field or tensor for anything formerkit would not reproduce
    exactly: an unknown model_type, a RoPE scaling scheme other than linear, dynamic, yarn and llama3 (and Phi-3's
    longrope), per-layer-type RoPE settings, a config value it does not implement, a missing weight, or an unexpected
    one (buffers such as GPT-2's ``attn.bias`` and LLaMA's ``rotary_emb.inv_freq`` are not weights and are ignored).

    The model comes alone; its tokenizer is ``formerkit.interop.read_hf_tokenizer(directory)`` and its generation
    config ``read_generation_config(directory)``. ``convert`` (``formerkit convert --from-hf``) saves all three.
    """
    return _read_hf(directory, trust_pickle)[0]


# ----- to Hugging Face -----


def _is_causal_lm(config: ModelConfig) -> bool:
    return config.arch == "decoder" and config.head.kind == "lm"


def _write_hf(model: torch.nn.Module, directory: str | Path, model_type: str | None = None,
              tokenizer: Tokenizer | None = None, generation_config: dict[str, Any] | None = None) -> tuple[str, str]:
    """Writes ``model`` (with its tokenizer and generation config) as a Hugging Face checkpoint; returns its
    model_type and architecture."""
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or not isinstance(config, ModelConfig):
        raise InteropError(f"to_hf: expected a formerkit model with a .config ModelConfig, got {type(model).__name__}")
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        raise InteropError(f"to_hf: tokenizer: expected a formerkit tokenizer (formerkit.data.tokenizers), got "
                           f"{type(tokenizer).__name__}")
    family, data = _family_for(config, model_type)
    architecture = data["architectures"][0]
    base = "" if config.head.kind == "none" else family.prefix
    state = {**hf_state(model, family.rules(config, base), architecture), **family.fixed(config, base)}
    directory = Path(directory)
    write_hf_files(directory, state, data)
    if tokenizer is not None:
        write_hf_tokenizer(tokenizer, directory, max_length=config.max_seq_len)
    if _is_causal_lm(config) and (tokenizer is not None or generation_config is not None):
        write_generation_config(generation_config_for(tokenizer, generation_config), directory)
    return data["model_type"], architecture


def to_hf(model: torch.nn.Module, directory: str | Path, *, model_type: str | None = None,
          tokenizer: Tokenizer | None = None, generation_config: dict[str, Any] | None = None) -> Path:
    """Writes a formerkit model as a Hugging Face checkpoint directory (``config.json`` + ``model.safetensors``);
    returns the directory.

    The family follows from the config: the first family of ``FAMILIES`` whose config.json reads back as the model's
    config. A decoder over tokens with learned positions is GPT-2 (OPT when GPT-2 cannot hold it: no biases,
    post-norm, no final norm), with RoPE LLaMA (Mistral for sliding windows on every layer, Qwen2 for
    query/key/value-only biases or windows on some layers, Qwen3 for query/key norms; RoPE scaling written as
    rope_parameters), Phi-3 for partial rotary or LongRoPE, or, for the LayerNorm decoders LLaMA cannot hold
    (parallel attention and MLP, partial rotary), the first of GPT-NeoX, Phi, GPT-J and Falcon that holds the model,
    and with Gemma's offset norm scales and scaled embeddings Gemma (Gemma 2 for sandwich norms, Gemma 3's text
    model with QK-norm as well);
    an encoder over tokens is BERT (DistilBERT without token types, RoBERTa for a masked-LM head over a non-GELU MLP),
    over patches ViT (DeiT with a distillation token); an encoder_decoder with relative positions is T5 (an encoder
    with them T5EncoderModel), with learned positions BART. ``model_type`` ("roberta", "opt", ...) asks for that family
    instead, when its checkpoints hold the model. The head picks the architecture written (GPT2LMHeadModel,
    LlamaForCausalLM, GPTNeoXForCausalLM, BertForMaskedLM, RobertaForSequenceClassification, DistilBertModel,
    ViTForImageClassification, DeiTForImageClassificationWithTeacher, T5ForConditionalGeneration, BartModel, ...),
    which transformers' Auto classes load with no missing or unexpected weights and the same outputs.

    With a ``tokenizer`` (any formerkit tokenizer: byte, char, bpe, or one imported from Hugging Face) it also writes
    ``tokenizer.json`` and ``tokenizer_config.json``, which ``transformers.AutoTokenizer`` reads with the same ids, and
    for a decoder language model ``generation_config.json``: ``generation_config`` if given (an imported model's),
    else formerkit generate's defaults with the tokenizer's special ids. ``transformers.pipeline("text-generation",
    model=directory)`` then works on the directory.

    Before writing anything, the config.json is read back and compared with the model's config; anything the Hugging
    Face class cannot hold (qk_norm outside a LLaMA layout, LayerScale, shared layers, ALiBi, a conv stem, a BERT
    without its pooler, ...) is an ``InteropError`` naming the formerkit field. Stochastic depth (``drop_path``),
    which acts in training only, is not written: no Hugging Face class of these families has it, and the outputs are
    the same. Other files in ``directory`` are left alone (a tokenizer, unless one is given); one holding other
    weight files is refused.
    """
    _write_hf(model, directory, model_type, tokenizer, generation_config)
    return Path(directory)


def imported_record(directory: str | Path, model_type: str, architecture: str) -> dict[str, Any]:
    """What a converted checkpoint keeps in its saved model's extra about where it came from."""
    return {"format": "huggingface", "model_type": model_type, "architecture": architecture,
            "source": str(Path(directory).resolve())}


def convert(source: str | Path, out: str | Path, *, direction: str, trust_pickle: bool = False,
            model_type: str | None = None) -> dict[str, Any]:
    """Converts a checkpoint directory: ``direction="from_hf"`` reads a Hugging Face one and saves it with
    ``formerkit.save``; ``"to_hf"`` loads a formerkit one (a saved model, or a run directory's) with
    ``formerkit.load`` and writes it with ``to_hf``.

    The text side travels with the weights both ways. From Hugging Face: ``tokenizer.json`` with
    ``tokenizer_config.json`` (special tokens, chat template) becomes the saved model's ``tokenizer.json`` (an ``hf``
    tokenizer, see ``formerkit.interop.tokenizers``) and ``generation_config.json`` is kept in its extra
    (``"generation"``), so ``formerkit generate``, ``serve``, ``predict``, ``inspect`` and ``report`` take text and
    stop at the checkpoint's end-of-sequence tokens. To Hugging Face: the saved model's tokenizer (a run's byte, char
    or bpe tokenizer, or an imported one) and generation config are written beside the weights.

    ``out`` must not exist or be empty (nothing is overwritten). ``trust_pickle`` applies to ``from_hf`` only,
    ``model_type`` (the family to write, see ``to_hf``) to ``to_hf`` only.
    Returns a summary: direction, family (the Hugging Face model_type), architecture, parameters, source, out and
    tokenizer (its kind, or None).
    """
    if direction not in ("from_hf", "to_hf"):
        raise InteropError(f"convert: direction: expected 'from_hf' or 'to_hf', got {direction!r}")
    if model_type is not None and direction != "to_hf":
        raise InteropError(f"convert: model_type: applies to direction 'to_hf' only (a checkpoint's config.json "
                           f"names its own), got {model_type!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError(f"convert: {out} already exists and is not empty; give a new or empty output directory "
                           "(nothing was written)")
    if direction == "from_hf":
        # The tokenizer files are read first: a slow-only tokenizer is refused before anything is written.
        tokenizer, generation = read_hf_tokenizer(source), read_generation_config(source)
        model, family, architecture = _read_hf(source, trust_pickle)
        extra: dict[str, Any] = {"imported": imported_record(source, family, architecture)}
        if _is_causal_lm(model.config):
            extra["objective"] = "causal_lm"
        if generation is not None:
            extra["generation"] = generation
        if tokenizer is not None:
            extra["preprocessing"] = {"kind": "text", "tokenizer": tokenizer.describe()}
        save(model, out, extra=extra)
        if tokenizer is not None:
            save_tokenizer(tokenizer, out / "tokenizer.json")
    else:
        if (Path(source) / "model" / "config.json").is_file():  # a run directory: its saved model
            source = Path(source) / "model"
        model = load(source)
        path = Path(source) / "tokenizer.json"
        tokenizer = load_tokenizer(path) if path.is_file() else None
        family, architecture = _write_hf(model, out, model_type, tokenizer, load_extra(source).get("generation"))
    return {"direction": direction, "family": family, "architecture": architecture,
            "parameters": sum(p.numel() for p in model.parameters()), "source": str(source), "out": str(out),
            "tokenizer": None if tokenizer is None else tokenizer.kind}
