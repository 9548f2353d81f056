"""Interop: models in and out of other libraries' checkpoint formats (local files only, nothing downloaded)."""

from formerkit.interop.hf import convert, from_hf, to_hf

__all__ = ["convert", "from_hf", "to_hf"]
