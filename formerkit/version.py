"""The package version, in a module of its own: ``formerkit.checkpoint`` records it in every saved model, and
importing it from ``formerkit`` (whose ``__init__`` imports the checkpoint module) would be an import cycle."""

__version__ = "0.1.0"
