"""Shrinking a trained model: distillation, structured pruning, quantization, and the Pareto comparison of variants.

Each tool is a library function here and a ``formerkit`` command, and each writes a normal model directory (with the
run's recipe beside the weights) that ``eval``, ``generate``, ``export``, ``compare`` and the next tool accept.
"""
