import json

import numpy as np
import pytest

from jax_adapter.nn.geometry import compute_geometry, reference_points
from tests.helpers import FIXTURES

GOLDEN = json.loads((FIXTURES / "seed_adapter_geometry.json").read_text())


def _is_empty(entry):
    return min(min(o) for o in entry["outputs"]) == 0 or min(entry["x_out"]) == 0


@pytest.mark.parametrize("size", sorted(GOLDEN))
def test_geometry_matches_reference(size):
    h, w = map(int, size.split("x"))
    entry = GOLDEN[size]
    if _is_empty(entry):
        with pytest.raises(ValueError, match="too small"):
            compute_geometry(h, w, 14)
        return
    g = compute_geometry(h, w, 14)
    assert list(g.padded) == entry["padded"]
    assert list(g.spm_shapes[0]) == entry["spm_c1"]
    assert list(g.level_lengths) == entry["spm_level_lengths"]
    assert [list(o) for o in g.output_sizes] == entry["outputs"]
    assert list(g.vit_output_size) == entry["x_out"]


def test_empty_size_is_in_fixture():
    # The fixture's refusal case must exist, or the refusal test above proves nothing.
    assert any(_is_empty(e) for e in GOLDEN.values())


def test_seed_size_is_not_floor_division():
    g = compute_geometry(256, 704, 14)
    assert g.padded == (266, 714)
    assert g.level_shapes == ((34, 90), (17, 45), (9, 23))
    assert g.num_spm_tokens == 4032
    assert g.level_starts == (0, 3060, 3825)
    assert g.vit_grid == (19, 51)


def test_reference_points_pixel_centres_row_major():
    pts = reference_points(((2, 3), (1, 1)))
    expected = [[1 / 6, 1 / 4], [3 / 6, 1 / 4], [5 / 6, 1 / 4],
                [1 / 6, 3 / 4], [3 / 6, 3 / 4], [5 / 6, 3 / 4], [0.5, 0.5]]
    np.testing.assert_allclose(pts, expected, rtol=0, atol=1e-7)
    g = compute_geometry(61, 83, 14)
    assert g.injector_reference_points.shape == (g.num_vit_tokens, 2)
    assert g.extractor_reference_points.shape == (g.num_spm_tokens, 2)


@pytest.mark.parametrize("bad", [(0, 10), (-3, 20), (10.5, 20), (True, 20)])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ValueError):
        compute_geometry(*bad)
