"""The tiny trained classifier of the compression tools' tests (trained once per test session)."""

from __future__ import annotations

import pytest

from ..conftest import tiny_overrides

# conftest's tiny cct-digits with 2 layers, so that a layer can be pruned or distilled away.
TWO_LAYERS = {"model.num_layers": 2}
TINY_CLASSIFIER = tiny_overrides("cct-digits", **TWO_LAYERS)


@pytest.fixture(scope="session")
def tiny_classifier_run(trained_run):
    """A cct-digits run shrunk to 2 layers of width 32 and 6 steps: its directory."""
    return trained_run("cct-digits", **TWO_LAYERS)
