import copy

import numpy as np
import pytest

#: One of each shape family torch's BatchNorm1d/2d/3d takes (axis=1), and channels-last.
SHAPES = [
    ((16, 5), 1),            # BatchNorm1d (N, C)
    ((4, 3, 7), 1),          # BatchNorm1d (N, C, L), short planes: rows layout
    ((3, 4, 100), 1),        # (N, C, L), planes layout
    ((2, 3, 9, 11), 1),      # BatchNorm2d
    ((2, 3, 2, 5, 7), 1),    # BatchNorm3d
    ((5, 6, 7, 3), -1),      # channels-last images
    ((6, 4), -1),
]
DTYPES = [np.float32, np.float64]
#: Relative tolerance of float32 results against the float64 reference.
RTOL = {np.float32: 2e-5, np.float64: 1e-12}
ATOL = {np.float32: 2e-5, np.float64: 1e-12}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_input(rng, shape, dtype, loc=0.5, scale=2.0):
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def channels(shape, axis):
    return shape[axis]


#: Parts of a layer that hold no state of their own: compared by identity.
SHARED = ("_backend", "_collective")


def snapshot(layer):
    """A deep copy of a layer's state, for :func:`assert_unchanged`."""
    return {k: v if k in SHARED else copy.deepcopy(v) for k, v in vars(layer).items()}


def assert_unchanged(layer, before):
    """The layer's state equals the :func:`snapshot` ``before`` (saved
    forward context aside): a refused input changed nothing."""
    after = vars(layer)
    assert after.keys() == before.keys()
    for k, v in before.items():
        if k in SHARED:
            assert after[k] is v, k
        elif isinstance(v, np.ndarray):
            np.testing.assert_array_equal(after[k], v)
        elif k == "_correction":
            assert vars(after[k]) == vars(v), k
        elif k != "_saved":
            assert after[k] == v, k
