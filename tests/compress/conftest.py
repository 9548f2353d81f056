"""Tiny trained runs for the compression tools' tests (trained once per test session)."""

from __future__ import annotations

import pytest

from ..conftest import tiny_overrides

# conftest's tiny cct-digits with 2 layers, so that a layer can be pruned or distilled away.
TINY_CLASSIFIER = tiny_overrides("cct-digits", **{"model.num_layers": 2})


@pytest.fixture(scope="session")
def tiny_classifier_run(tmp_path_factory):
    """A cct-digits run shrunk to 2 layers of width 32 and 6 steps: its directory."""
    from formerkit.train.trainer import train

    out = tmp_path_factory.mktemp("runs") / "cct"
    train("cct-digits", out, overrides=TINY_CLASSIFIER)
    return out
