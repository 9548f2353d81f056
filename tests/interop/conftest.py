"""Shared checks for Hugging Face parity tests: one family's test module builds tiny random ``transformers`` models
and calls the ``parity`` fixture's checks, so every family is held to the same standard.

- ``parity.save(architecture, config_class, fields, directory, seed)``: a random-weight transformers model saved with
  ``save_pretrained`` (nothing is downloaded); returns the model in eval mode.
- ``parity.load_hf(directory)``: loads a written checkpoint with the Auto class its ``architectures`` calls for (an
  encoder-decoder's encoder alone, such as T5EncoderModel, with its own class) and checks that transformers found
  every weight and nothing else.
- ``parity.tokens(vocab, length, batch, padding)``: token ids and an attention mask (``padding``: "right", "left" or
  None), rows of different real lengths.
- ``parity.assert_logits(ours, theirs, inputs)``: formerkit's and transformers' outputs equal within 1e-4 at real
  tokens; returns the max |difference|.
- ``parity.assert_greedy(theirs, ours, vocab, new_tokens)``: greedy generation after left-padded prompts of
  different lengths, token-identical to ``transformers.generate`` (decoders; encoder-decoders with
  ``encoder_decoder=True``).
- ``parity.assert_round_trip(ours, directory, inputs, expected)``: ``to_hf(ours)`` reloaded by transformers gives
  ``expected``.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor

TOLERANCE = 1e-4

# transformers' Auto class for each kind of architecture (a base model loads with AutoModel).
AUTO = {"ForCausalLM": "AutoModelForCausalLM", "LMHeadModel": "AutoModelForCausalLM",
        "ForMaskedLM": "AutoModelForMaskedLM", "ForSequenceClassification": "AutoModelForSequenceClassification",
        "ForImageClassification": "AutoModelForImageClassification",
        "ForImageClassificationWithTeacher": "AutoModelForImageClassification",
        "ForConditionalGeneration": "AutoModelForSeq2SeqLM"}


class Parity:
    def __init__(self, randomize):
        self.randomize = randomize

    def save(self, architecture: str, config_class: str, fields: dict, directory, seed: int = 1):
        import transformers

        torch.manual_seed(0)
        model = getattr(transformers, architecture)(getattr(transformers, config_class)(**fields))
        self.randomize(model, seed=seed)
        model.eval().save_pretrained(directory, safe_serialization=True)
        return model

    def load_hf(self, directory) -> torch.nn.Module:
        import transformers

        architecture = json.loads((directory / "config.json").read_text())["architectures"][0]
        auto = next((name for suffix, name in AUTO.items() if architecture.endswith(suffix)), "AutoModel")
        # An encoder-decoder family's encoder alone (T5EncoderModel) has no Auto class: AutoModel builds the whole
        # encoder-decoder. It loads with its own class.
        loader = getattr(transformers, architecture if architecture.endswith("EncoderModel") else auto)
        model, info = loader.from_pretrained(directory, output_loading_info=True)
        assert type(model).__name__ == architecture
        assert {key: value for key, value in info.items() if value} == {}, "transformers reported loading problems"
        return model.eval()

    @staticmethod
    def tokens(vocab: int, length: int, batch: int = 2, padding: str | None = "right", seed: int = 2,
               low: int = 0) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(low, vocab, (batch, length), generator=generator)
        if padding is None:
            return {"input_ids": ids}
        real = torch.tensor([length - 3 * row for row in range(batch)]).clamp(min=1).unsqueeze(1)
        positions = torch.arange(length).unsqueeze(0)
        mask = positions < real if padding == "right" else positions >= length - real
        return {"input_ids": ids, "attention_mask": mask.long()}

    @staticmethod
    def assert_logits(ours: Tensor, theirs: Tensor, inputs: dict[str, Tensor] | None = None,
                      what: str = "logits") -> float:
        """Per-token outputs are compared at real (unpadded) tokens only."""
        real = None if inputs is None else inputs.get("attention_mask")
        if real is not None and ours.dim() == 3 and ours.shape[1] == real.shape[1]:
            ours, theirs = ours[real.bool()], theirs[real.bool()]
        assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
        diff = (ours - theirs).abs().max().item()
        assert diff <= TOLERANCE, f"{what} differs by {diff:.3g}"
        return diff

    @torch.no_grad()
    def assert_greedy(self, theirs, ours, vocab: int, new_tokens: int = 20, *, prompt_length: int = 7,
                      encoder_decoder: bool = False, pad: int = 0, seed: int = 4) -> Tensor:
        """Greedy tokens after prompts of different lengths (left-padded for decoders; right-padded encoder inputs
        for encoder-decoders), token-identical to ``transformers.generate``. No end-of-sequence token and no forced
        first or last token (BART's defaults force its end token at the length limit): transformers then generates
        every token greedily, as formerkit does. An encoder-decoder's target starts from the checkpoint's
        decoder_start_token_id on both sides (formerkit reads it from its config)."""
        generator = torch.Generator().manual_seed(seed)
        prompts = torch.randint(1, vocab, (3, prompt_length), generator=generator)
        mask = torch.ones_like(prompts)
        if encoder_decoder:
            mask[1, prompt_length - 3:] = 0
            mask[2, 2:] = 0
        else:
            mask[1, :3] = 0
            mask[2, : prompt_length - 1] = 0
        prompts = prompts.masked_fill(mask == 0, pad)
        theirs.generation_config.eos_token_id = None
        theirs.generation_config.forced_eos_token_id = None
        theirs.generation_config.forced_bos_token_id = None
        expected = theirs.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=pad)
        got = ours.generate(prompts, new_tokens, attention_mask=mask, temperature=0)
        assert got.shape == expected.shape, (got.shape, expected.shape)
        assert torch.equal(got, expected), f"greedy tokens differ:\n{got}\n{expected}"
        return got

    @torch.no_grad()
    def assert_round_trip(self, ours, directory, inputs: dict[str, Tensor], expected: Tensor, output=None) -> float:
        """``to_hf(ours)`` reloaded by transformers computes ``expected`` (``output`` picks the tensor from the
        reloaded model's output; default its logits)."""
        import formerkit

        formerkit.to_hf(ours, directory)
        back = self.load_hf(directory)
        out = back(**inputs)
        got = output(out) if output is not None else out.logits
        return self.assert_logits(got, expected, inputs, "to_hf(from_hf(x)) reloaded")


@pytest.fixture(scope="session")
def parity(randomize) -> Parity:
    return Parity(randomize)
