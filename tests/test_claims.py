"""python -m nbbn demo --claims: the verdict rule, every experiment at a tiny size (a fixed
seed gives a fixed result), the MLP options they use (activations, dropout, init scale),
the probes that leave a network as they found it, the figures and the command line."""
import argparse
import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nbbn
from naive import numeric_gradient
from nbbn.programs import claims_experiments as ce
from nbbn.programs.claims import (FULL, TINY, ClaimResult, Comparison, format_details,
                                  format_verdicts, verdict)
from nbbn.programs.claims_experiments import run_claims
from nbbn.programs.mlp import MLP, Dropout, Linear, cross_entropy

ROOT = Path(__file__).resolve().parents[1]
needs_sklearn = pytest.mark.skipif(
    __import__("importlib").util.find_spec("sklearn") is None,
    reason="the claims' data needs scikit-learn (extra 'demo')")


@contextlib.contextmanager
def reference_precise_statistics(layers):
    """The documented interface of ``nbbn.precise_statistics``, slowly: training mode in
    the block, exact mean and unbiased variance of every input on a clean exit."""
    layers = list(layers)
    modes, seen = [layer.training for layer in layers], [[] for _ in layers]
    for layer, inputs in zip(layers, seen):
        def forward(x, out=None, _forward=layer.forward, _inputs=inputs):
            _inputs.append(np.moveaxis(np.asarray(x, np.float64), 1, -1).reshape(
                -1, x.shape[1]))
            return _forward(x, out=out)
        layer.forward = forward
        layer.train()
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes):
            del layer.forward
            layer.train(mode)
    for layer, inputs in zip(layers, seen):
        values = np.concatenate(inputs)
        layer.running_mean[...] = values.mean(axis=0)
        layer.running_var[...] = values.var(axis=0, ddof=1)


# The verdict rule ------------------------------------------------------------------------

def test_a_setting_is_won_when_the_mean_difference_beats_its_spread():
    assert Comparison("s", "m", "higher", [0.9, 0.8, 0.85], [0.5, 0.45, 0.5]).won
    assert not Comparison("s", "m", "lower", [0.9, 0.8, 0.85], [0.5, 0.45, 0.5]).won
    # paired: a consistent difference wins even when seeds differ a lot
    assert Comparison("s", "m", "higher", [0.2, 0.5, 0.9], [0.1, 0.4, 0.8]).won
    # mean difference 0.1, spread 0.17: not won
    assert not Comparison("s", "m", "higher", [0.3, 0.5, 0.7], [0.3, 0.5, 0.4]).won
    assert not Comparison("s", "m", "lower", [100, 100], [100, 100]).won     # equal
    assert Comparison("s", "m", "lower", [40, 50], [90, 100]).won
    one = Comparison("s", "m", "higher", [0.6], [0.5])                       # one seed
    assert one.won and one.cells() == ("0.600 ± 0.000", "0.500 ± 0.000", "0.100 ± 0.000")


def test_verdict_holds_mixed_does_not_hold():
    win = Comparison("a", "m", "higher", [1, 1.1], [0, 0])
    loss = Comparison("b", "m", "higher", [0, 0], [1, 1.1])
    assert verdict([win, win]) == "holds"
    assert verdict([win, loss]) == "mixed"
    assert verdict([loss]) == "does not hold"


def test_comparison_rejects_bad_input():
    with pytest.raises(ValueError, match="better"):
        Comparison("s", "m", "more", [1], [1])
    with pytest.raises(ValueError, match="one value per seed"):
        Comparison("s", "m", "higher", [1, 2], [1])


def test_tables():
    c = Comparison("lr 0.1", "steps to 90%", "lower", [40, 50], [90, 100], ".0f")
    r = ClaimResult("speed", "fewer steps", ("BatchNorm", "plain"), [c], c,
                    extra=[Comparison("x", "y", "higher", [1, 1], [0, 0])])
    table = format_verdicts([r])
    assert table.splitlines()[2] == (
        "| speed: fewer steps | steps to 90% (lr 0.1; lower is claimed) | 45 ± 7 | 95 ± 7 | "
        "-50 ± 0 | 1 of 1 | **holds** |")
    details = format_details(r)
    assert "| lr 0.1 | steps to 90% (lower) | 45 ± 7 | 95 ± 7 | -50 ± 0 | yes |" in details
    assert details.endswith("(not counted) |")


# The MLP options the experiments use -----------------------------------------------------

@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_activation_and_dropout_gradients_match_finite_differences(activation, batch_norm):
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((10, 5)) * 2, rng.integers(0, 3, 10)
    net = MLP([5, 6, 4, 3], batch_norm, seed=1, activation=activation, dropout=0.3)
    drops = [layer for layer in net.layers if isinstance(layer, Dropout)]
    assert len(drops) == 2

    def logits():
        for i, d in enumerate(drops):          # the same masks at every evaluation
            d.rng = np.random.default_rng(i)
        return net.forward(x)

    def loss():
        return cross_entropy(logits(), labels)[0]

    dx = net.backward(cross_entropy(logits(), labels)[1])
    grads = [g.copy() for g in net.gradients()]
    for p, g in zip(net.parameters(), grads):
        np.testing.assert_allclose(g, numeric_gradient(loss, p), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(dx, numeric_gradient(loss, x), rtol=1e-5, atol=1e-8)


def test_sigmoid_does_not_overflow_and_dropout_semantics():
    net = MLP([2, 3, 2], False, activation="sigmoid", dtype=np.float32)
    with np.errstate(all="raise"):
        y = net.layers[1].forward(np.array([[-1e4, 0, 1e4]], np.float32))
    np.testing.assert_array_equal(y, [[0, 0.5, 1]])
    d = Dropout(0.25, np.random.default_rng(0))
    x = np.ones((400, 50))
    y = d.forward(x)
    assert set(np.unique(y)) == {0, 4 / 3} and abs((y == 0).mean() - 0.25) < 0.01
    np.testing.assert_array_equal(d.backward(x), y)
    d.train(False)
    assert d.forward(x) is x and d.backward(x) is x
    with pytest.raises(ValueError, match="got 1"):
        Dropout(1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="activation must be one of"):
        MLP([2, 3, 2], activation="gelu")


def test_options_keep_the_initial_weights():
    def weights(net):
        return [layer.weight for layer in net.layers if isinstance(layer, Linear)]

    base = weights(MLP([6, 5, 4, 2], True, seed=3))
    for kw in ({"batch_norm": False}, {"dropout": 0.5}, {"activation": "tanh"}):
        for a, b in zip(base, weights(MLP([6, 5, 4, 2], seed=3, **kw))):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(base, weights(MLP([6, 5, 4, 2], seed=3, init_scale=100.0))):
        np.testing.assert_allclose(b, 100 * a, rtol=1e-14)
    net = MLP([6, 5, 4, 2], seed=3, dropout=0.5).eval()
    assert all(not layer.training for layer in net.layers if hasattr(layer, "training"))


# The probes ------------------------------------------------------------------------------

def _state(net):
    return [(bn.running_mean.copy(), bn.running_var.copy(), bn.num_batches_tracked)
            for bn in net.norms]


def _assert_state(net, state):
    for bn, (mean, var, tracked) in zip(net.norms, state):
        np.testing.assert_array_equal(bn.running_mean, mean)
        np.testing.assert_array_equal(bn.running_var, var)
        assert bn.num_batches_tracked == tracked and not bn.training


def test_probes_leave_the_network_as_they_found_it():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((50, 6)).astype(np.float32), rng.integers(0, 3, 50)
    net = MLP([6, 8, 3], seed=0, dtype=np.float32)
    net.forward(x[:20])
    net.eval()
    state = _state(net)
    twin = copy.deepcopy(net).train()
    expected = np.concatenate([np.argmax(twin.forward(x[i:i + 16]), 1) for i in (0, 16, 32)])
    assert ce.batch_stats_accuracy(net, x, y, 16) == (expected == y[:48]).mean()  # 3 batches
    _assert_state(net, state)
    ce.precise_accuracy(net, x, x[:10], y[:10], 16)
    _assert_state(net, state)


def test_precise_statistics_has_the_documented_interface():
    rng = np.random.default_rng(5)
    nets = [MLP([4, 6, 5, 3], seed=1) for _ in range(2)]
    batches = [rng.standard_normal((n, 4)) * 3 + 1 for n in (7, 16, 2)]
    for net, stats in zip(nets, (nbbn.precise_statistics, reference_precise_statistics)):
        net.eval()
        with stats(net.norms):
            for xb in batches:
                net.forward(xb)
        assert all(not bn.training for bn in net.norms)
    for a, b in zip(*(net.norms for net in nets)):
        np.testing.assert_allclose(a.running_mean, b.running_mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a.running_var, b.running_var, rtol=1e-6, atol=1e-7)


# The experiments -------------------------------------------------------------------------

def _numbers(results):
    return [(r.name, r.verdict, [(c.setting, c.a.tolist(), c.b.tolist())
                                 for c in r.comparisons + r.extra]) for r in results]


@needs_sklearn
def test_every_claim_runs_tiny_and_a_seed_fixes_the_result(tmp_path):
    names = list(ce.CLAIMS)
    first = run_claims(names, TINY, log=lambda line: None)
    assert [r.name for r in first] == names
    for r in first:
        assert r.verdict in ("holds", "does not hold", "mixed") and r.comparisons
        assert all(len(c.a) == len(TINY.seeds) for c in r.comparisons)
        assert r.seconds > 0
    again = run_claims(names, TINY, log=lambda line: None)
    assert _numbers(again) == _numbers(first)
    table = format_verdicts(first)
    assert len(table.splitlines()) == 2 + len(names)
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (extra 'demo')")
    from nbbn.programs.claims_plots import plot_claims
    paths = plot_claims(first, tmp_path / "figs")
    assert sorted(os.path.basename(p) for p in paths) == sorted(f"{n}.png" for n in names)
    for p in paths:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_sklearn
def test_runs_are_shared_and_pair_the_same_seeds():
    runner = ce.Runner(TINY)
    a = runner.run(0, 0.3, norm="bn")
    assert runner.run(0, 0.3, norm="bn") is a
    b = runner.run(0, 0.3, norm="none")
    assert a["eval_steps"] == b["eval_steps"] and a["budget"] == b["budget"] == TINY.steps
    assert "end_batch_acc" in a and "end_batch_acc" not in b
    assert 0 <= a["end_acc"] <= 1


def test_full_config_meets_the_brief():
    assert len(FULL.seeds) >= 3
    scales = [s for s in FULL.init_scales]
    assert max(scales) / min(scales) >= 1e4 and 1.0 in scales
    assert {2, 4, 8, 16, 64} <= set(FULL.batch_sizes)


# The command line ------------------------------------------------------------------------

def _parse(argv):
    from nbbn.programs import demo
    return demo, demo.add_arguments(argparse.ArgumentParser()).parse_args(argv)


@pytest.mark.parametrize("argv,message", [
    (["--claims", "--steps", "10"], "--steps set the plain demo"),
    (["--claim", "speed", "--lr", "1", "--seed", "2"], "--lr, --seed set the plain demo"),
    (["--tiny"], "go with --claims"),
    (["--claims", "--seeds", "0"], "expected --seeds >= 1")])
def test_claims_reject_the_plain_demo_options(argv, message):
    demo, args = _parse(argv)
    with pytest.raises(SystemExit, match=message):
        demo.main(args)


@needs_sklearn
def test_claim_picks_claims_in_table_order(capsys):
    demo, args = _parse(["--claim", "init", "--claim", "speed", "--claim", "init", "--tiny"])
    assert demo.main(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| speed: ", "| init: "))]
    assert [row.split(":")[0] for row in rows] == ["| speed", "| init"]


@needs_sklearn
def test_command_line(tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (extra 'demo')")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-m", "nbbn", "demo", "--claims", "--tiny", "--plot", "figs"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    names = list(ce.CLAIMS)
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")
            and line.endswith(("**holds** |", "**does not hold** |", "**mixed** |"))]
    assert [row[2:].split(":")[0] for row in rows] == names
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(
        f"{n}.png" for n in names)
