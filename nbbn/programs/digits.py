"""The data of the demo and the claims: scikit-learn's bundled handwritten digits
(extra ``demo``)."""
import numpy as np

__all__ = ["load_digits_split"]


def load_digits_split(seed=0, test_fraction=0.25, dtype=np.float32):
    """The 1797 8x8 digits of ``sklearn.datasets.load_digits`` (bundled, no download),
    pixels scaled to [0, 1], shuffled with ``seed`` and split into train and test.

    Returns
    -------
    x_train, y_train, x_test, y_test : ndarray
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise RuntimeError("the demo needs scikit-learn: pip install 'nbbn[demo]'") from e
    data = load_digits()
    x, y = (data.data / 16.0).astype(dtype), data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, tr = order[:n_test], order[n_test:]
    return x[tr], y[tr], x[test], y[test]
