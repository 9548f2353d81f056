"""Adapting a model cheaply: the method registry (``methods``) and the methods that register themselves in it."""

from formerkit.adapt import adapter, partial, prefix, prompt  # noqa: F401  (each registers its method)
from formerkit.adapt.methods import METHODS, AdapterModule, register_method

__all__ = ["METHODS", "AdapterModule", "register_method"]
