"""Interop: models in and out of other libraries' checkpoint formats (local files only, nothing downloaded)."""

from formerkit.interop.hf import convert, from_hf, to_hf
from formerkit.interop.tokenizers import read_generation_config, read_hf_tokenizer, write_hf_tokenizer

__all__ = ["convert", "from_hf", "read_generation_config", "read_hf_tokenizer", "to_hf", "write_hf_tokenizer"]
