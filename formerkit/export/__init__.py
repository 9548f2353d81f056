"""Exporting models to files that run without formerkit: ONNX (onnxruntime) and ``torch.export`` programs (.pt2)."""

from formerkit.export.exporter import FORMATS, MAX_SEQ_LEN_KEY, export, export_run, run_onnx

__all__ = ["FORMATS", "MAX_SEQ_LEN_KEY", "export", "export_run", "run_onnx"]
