"""Benchmarks: measured, not asserted. Each is a library function returning records, with a CLI command
(``formerkit bench ...``) that prints a table and can write JSON and a plot."""

from formerkit.bench.attention import attention_benchmark

__all__ = ["attention_benchmark"]
