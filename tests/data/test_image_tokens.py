"""Images as tokens (formerkit.data.image_tokens): pixel levels and a k-means patch codebook, each encoded and
decoded back, and rebuilt from the description a run saves."""

from __future__ import annotations

import itertools

import pytest
import torch

from formerkit.data.image_tokens import PatchCodebook, PixelTokens, image_tokenizer, raw_images
from formerkit.errors import InputError

# Four 2x2 patterns (raw units); images are tilings of them, so a 4-centre codebook must find them exactly.
PATTERNS = torch.tensor([[0.0, 0.0, 0.0, 0.0], [16.0, 16.0, 16.0, 16.0], [0.0, 16.0, 0.0, 16.0],
                         [8.0, 4.0, 12.0, 0.0]])


def tiled(codes: torch.Tensor) -> torch.Tensor:
    """Images [N, 1, 4, 4] whose 2x2 patches (row-major) are PATTERNS[codes[n]], written out pixel by pixel."""
    images = torch.zeros(len(codes), 1, 4, 4)
    for n, (row, col) in itertools.product(range(len(codes)), itertools.product(range(2), range(2))):
        patch = PATTERNS[codes[n, row * 2 + col]].view(2, 2)
        images[n, 0, row * 2:row * 2 + 2, col * 2:col * 2 + 2] = patch
    return images


def test_pixel_tokens_are_the_intensity_levels_and_decode_back_exactly():
    tokens = PixelTokens(17, (1, 2, 2))
    images = torch.tensor([[[[0.0, 16.0], [7.0, 3.0]]]])
    assert tokens.encode(images).tolist() == [[0, 16, 7, 3]]
    assert torch.equal(tokens.decode(tokens.encode(images)), images)
    # Off-level values round to the nearest level, out-of-range ones clamp.
    assert tokens.encode(torch.tensor([[[[0.4, 16.7], [6.5001, -2.0]]]])).tolist() == [[0, 16, 7, 0]]


def test_a_codebook_encodes_each_patch_as_its_nearest_centre_and_round_trips():
    codebook = PatchCodebook(PATTERNS, 2, (1, 4, 4))
    codes = torch.randint(4, (6, 4), generator=torch.Generator().manual_seed(3))
    images = tiled(codes)
    assert torch.equal(codebook.decode(codes), images)
    assert torch.equal(codebook.encode(images), codes)
    # Off-centre patches go to the nearest centre: pattern 3 (8, 4, 12, 0) moved by (1, -1, 1, 1) stays 3.
    moved = images.clone()
    moved[0, 0, :2, :2] = PATTERNS[codes[0, 0]].view(2, 2) + torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    assert torch.equal(codebook.encode(moved), codes)


@pytest.mark.slow  # scikit-learn's import alone takes seconds
def test_a_codebook_fitted_on_tilings_finds_the_patterns_and_round_trips():
    codes = torch.randint(4, (40, 4), generator=torch.Generator().manual_seed(0))
    images = tiled(codes)
    codebook = PatchCodebook.fit(images, size=4, patch_size=2, seed=0)
    # The centres are the four patterns (in k-means' own order).
    order = torch.cdist(PATTERNS, codebook.centres).argmin(dim=1)
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(codebook.centres[order], PATTERNS, atol=1e-5)
    encoded = codebook.encode(images)
    assert torch.equal(encoded, order[codes])
    assert torch.allclose(codebook.decode(encoded), images, atol=1e-5)
    # And tokens -> image -> tokens gives the tokens back.
    any_codes = torch.randint(4, (7, 4), generator=torch.Generator().manual_seed(1))
    assert torch.equal(codebook.encode(codebook.decode(any_codes)), any_codes)


def test_a_saved_description_rebuilds_the_same_tokenizer():
    codebook = PatchCodebook(PATTERNS, 2, (1, 4, 4))
    rebuilt = image_tokenizer(codebook.describe())
    images = tiled(torch.randint(4, (5, 4), generator=torch.Generator().manual_seed(2))) + 0.3
    assert torch.equal(rebuilt.encode(images), codebook.encode(images))
    pixels = PixelTokens(17, (1, 4, 4))
    assert image_tokenizer(pixels.describe()).describe() == pixels.describe()


def test_raw_images_undo_the_bundles_normalization():
    raw = torch.tensor([[[[0.0, 16.0], [8.0, 4.0]]]])
    preprocessing = {"scale": 1 / 16, "mean": [0.3], "std": [0.5]}
    normalized = (raw / 16 - 0.3) / 0.5
    assert torch.allclose(raw_images(normalized, preprocessing), raw, atol=1e-5)


def test_images_of_the_wrong_shape_and_bad_tokens_are_refused_by_name():
    codebook = PatchCodebook(PATTERNS, 2, (1, 4, 4))
    with pytest.raises(InputError, match="images"):
        codebook.encode(torch.zeros(2, 1, 8, 8))
    with pytest.raises(InputError, match="tokens"):
        codebook.decode(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(InputError, match="images"):
        PixelTokens(17, (1, 8, 8)).encode(torch.zeros(8, 8))
