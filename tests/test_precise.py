"""nbbn.precise_statistics: the running statistics recomputed exactly over a
pass of batches, against the float64 statistics of all the data."""
import numpy as np
import pytest

import nbbn
from conftest import assert_unchanged, snapshot
from test_mpi import on_ranks, thread_comms


def batches(rng, n=5, shape=(12, 3, 4), dtype=np.float64):
    """Batches of uneven sizes and drifting statistics (like a network that
    kept training): an exponential average would miss them."""
    sizes = [shape[0] + 3 * i for i in range(n)]
    return [(rng.standard_normal((k,) + shape[1:]) * (1 + i) + 2 * i).astype(dtype)
            for i, k in enumerate(sizes)]


def population(xs, axis=1):
    """float64 mean and unbiased variance per channel of all of ``xs`` together."""
    data = np.moveaxis(np.concatenate(xs), axis, -1).reshape(-1, xs[0].shape[axis])
    return data.mean(0), data.var(0, ddof=1)


@pytest.mark.parametrize("layer", [
    lambda: nbbn.BatchNorm(3, dtype=np.float64),
    lambda: nbbn.BatchNorm(3, dtype=np.float64, virtual_batch_size=5, activation="relu"),
    lambda: nbbn.BatchRenorm(3, dtype=np.float64),
])
def test_statistics_of_all_the_batches(rng, layer):
    bn = layer().eval()
    bn.num_batches_tracked = 7
    xs = batches(rng)
    with nbbn.precise_statistics([bn, bn]):  # a layer listed twice records once
        assert bn.training
        for x in xs:
            bn(x)
    mean, var = population(xs)
    np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, var, rtol=1e-12)
    assert not bn.training and bn.num_batches_tracked == 7


def test_float32_layers_and_channels_last(rng):
    bn = nbbn.BatchNorm(3, axis=-1)
    xs = [np.moveaxis(x, 1, -1).astype(np.float32) for x in batches(rng)]
    with nbbn.precise_statistics([bn]):
        for x in xs:
            bn(x)
    mean, var = population([x.astype(np.float64) for x in xs], axis=-1)
    np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, var, rtol=1e-6)
    assert bn.running_mean.dtype == np.float32


def test_a_network_records_what_each_layer_sees_in_training_mode(rng):
    first, second = nbbn.BatchNorm(4, dtype=np.float64), nbbn.BatchNorm(4, dtype=np.float64)
    w = rng.standard_normal((4, 4))
    xs = [rng.standard_normal((16, 4)) + i for i in range(4)]

    def net(x):
        return second(np.maximum(first(x), 0) @ w)

    with nbbn.precise_statistics([first, second]):
        for x in xs:
            net(x)
    hidden = []
    for x in xs:  # what the second layer sees: batch-normalized first-layer outputs
        h = (x - x.mean(0)) / np.sqrt(x.var(0) + first.eps)
        hidden.append(np.maximum(h, 0) @ w)
    for layer, data in ((first, xs), (second, hidden)):
        mean, var = population(data)
        np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer.running_var, var, rtol=1e-10)


def test_synchronized_layers_record_the_whole_batch(rng):
    xs = batches(rng, shape=(9, 3, 2))
    comms = thread_comms(3)

    def rank(comm):
        bn = nbbn.SyncBatchNorm(3, dtype=np.float64, comm=comm)
        with nbbn.precise_statistics([bn]):
            for x in xs:
                bn(np.array_split(x, 3)[comm.Get_rank()])
        return bn.running_mean, bn.running_var

    mean, var = population(xs)
    for rm, rv in on_ranks(comms, rank):
        np.testing.assert_allclose(rm, mean, rtol=1e-12)
        np.testing.assert_allclose(rv, var, rtol=1e-12)


def test_an_error_or_no_batch_changes_nothing(rng):
    bn = nbbn.BatchNorm(3).eval()
    before = snapshot(bn)
    with pytest.raises(KeyError), nbbn.precise_statistics([bn]):
        bn(np.ones((4, 3), np.float32))
        raise KeyError("stop")
    assert_unchanged(bn, before)
    with pytest.raises(ValueError, match="saw no batch"), nbbn.precise_statistics([bn]):
        pass
    assert_unchanged(bn, before)
    with pytest.raises(ValueError, match="no running statistics"):
        with nbbn.precise_statistics([nbbn.BatchNorm(3, track_running_stats=False)]):
            pass
    with pytest.raises(TypeError, match="BatchNorm"):
        with nbbn.precise_statistics([object()]):
            pass
    with pytest.raises(ValueError, match="already recording"), nbbn.precise_statistics([bn]):
        with nbbn.precise_statistics([bn]):
            pass
    assert_unchanged(bn, before)
