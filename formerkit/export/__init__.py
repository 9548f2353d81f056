"""Exporting models to files that run without formerkit: ONNX (onnxruntime) and ``torch.export`` programs (.pt2)."""

from formerkit.export.exporter import FORMATS, export, export_run

__all__ = ["FORMATS", "export", "export_run"]
