"""The NumPy MLP of nbbn.programs.mlp (gradients against finite differences and torch) and the
training demo of nbbn.programs.demo (a short run, its table, its plot, its command line)."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nbbn
from conftest import assert_network_matches_torch
from naive import numeric_gradient
from nbbn.programs.mlp import MLP, Linear, accuracy, cross_entropy

ROOT = Path(__file__).resolve().parents[1]


def synthetic(rng, n=12, features=5, classes=3):
    x = rng.standard_normal((n, features)) * 2 + 1
    labels = rng.integers(0, classes, n)
    return x, labels


@pytest.mark.parametrize("batch_norm", [True, False])
def test_one_step_gradients_match_finite_differences(batch_norm):
    rng = np.random.default_rng(0)
    x, labels = synthetic(rng)
    net = MLP([5, 4, 6, 3], batch_norm, seed=3)
    for bn in net.norms:                       # away from the initial gamma=1, beta=0
        bn.gamma[:] = rng.uniform(0.5, 2, bn.num_features)
        bn.beta[:] = rng.standard_normal(bn.num_features)

    def loss():
        return cross_entropy(net.forward(x), labels)[0]

    _, dlogits = cross_entropy(net.forward(x), labels)
    dx = net.backward(dlogits)
    grads = [g.copy() for g in net.gradients()]
    params = net.parameters()
    assert len(grads) == len(params) == (8 if batch_norm else 6)
    for p, g in zip(params, grads):
        assert g.shape == p.shape and g.dtype == p.dtype
        np.testing.assert_allclose(g, numeric_gradient(loss, p), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(dx, numeric_gradient(loss, x), rtol=1e-5, atol=1e-8)

    # The SGD step is p - lr * grad, and a small one lowers the loss.
    before, lr = [p.copy() for p in params], 0.05
    loss0 = loss()
    net.forward(x)
    net.backward(cross_entropy(net.forward(x), labels)[1])
    net.sgd_step(lr)
    for p, p0, g in zip(net.parameters(), before, grads):
        np.testing.assert_allclose(p, p0 - lr * g, rtol=1e-12, atol=1e-15)
    assert loss() < loss0


def test_batch_norm_gradients_come_from_nbbn_backward(monkeypatch):
    calls = []
    original = nbbn.BatchNorm.backward

    def spy(self, dy, out=None):
        calls.append(dy.shape)
        return original(self, dy, out)

    monkeypatch.setattr(nbbn.BatchNorm, "backward", spy)
    rng = np.random.default_rng(1)
    x, labels = synthetic(rng)
    net = MLP([5, 4, 6, 3], seed=0)
    net.backward(cross_entropy(net.forward(x), labels)[1])
    assert calls == [(12, 6), (12, 4)]


def test_matches_torch_forward_and_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x, labels = synthetic(rng, n=16)
    net = MLP([5, 7, 4, 3], seed=5)
    linears = [layer for layer in net.layers if isinstance(layer, Linear)]
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7, bias=False), torch.nn.BatchNorm1d(7), torch.nn.ReLU(),
        torch.nn.Linear(7, 4, bias=False), torch.nn.BatchNorm1d(4), torch.nn.ReLU(),
        torch.nn.Linear(4, 3)).double()
    with torch.no_grad():
        for tl, nl in zip([model[0], model[3], model[6]], linears):
            tl.weight.copy_(torch.from_numpy(nl.weight))
        model[6].bias.copy_(torch.from_numpy(linears[2].bias))
    assert_network_matches_torch(
        net, model, x, labels,
        [model[0].weight, model[1].weight, model[1].bias, model[3].weight, model[4].weight,
         model[4].bias, model[6].weight, model[6].bias], [model[1], model[4]])


def test_cross_entropy_and_accuracy_against_float64_reference():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((9, 4)).astype(np.float32) * 30   # large: needs the shift
    labels = rng.integers(0, 4, 9)
    loss, d = cross_entropy(logits, labels)
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert loss == pytest.approx(-np.log(p[np.arange(9), labels]).mean(), rel=1e-10)
    onehot = np.eye(4)[labels]
    assert d.dtype == np.float32
    np.testing.assert_allclose(d, (p - onehot) / 9, rtol=1e-6, atol=1e-9)
    assert accuracy(np.eye(3)[[0, 1, 2, 1]], np.array([0, 1, 1, 1])) == 0.75


def test_same_seed_same_weights_and_float32():
    with_bn, without = MLP([6, 5, 4, 2], True, seed=7), MLP([6, 5, 4, 2], False, seed=7)
    wa = [layer.weight for layer in with_bn.layers if isinstance(layer, Linear)]
    wb = [layer.weight for layer in without.layers if isinstance(layer, Linear)]
    for a, b in zip(wa, wb):
        np.testing.assert_array_equal(a, b)
    net = MLP([6, 5, 4, 2], seed=0, dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    logits = net.forward(x)
    net.backward(cross_entropy(logits, np.arange(8) % 2)[1])
    assert logits.dtype == np.float32
    assert all(p.dtype == np.float32 for p in net.parameters())
    assert all(g.dtype == np.float32 for g in net.gradients())


def test_make_norm_plugs_in_another_layer():
    made = []

    def make_norm(c):
        made.append(nbbn.BatchNorm(c, momentum=None, dtype=np.float64))
        return made[-1]

    net = MLP([3, 4, 2], make_norm=make_norm)
    assert net.norms == made and len(made) == 1
    net.forward(np.random.default_rng(0).standard_normal((5, 3)))
    assert made[0].num_batches_tracked == 1
    assert net.eval().norms[0].training is False


@pytest.mark.parametrize("sizes,kwargs,error", [
    ([5], {}, ValueError), ([5, 0, 2], {}, ValueError), ([5, 3], {"dtype": np.int32}, TypeError)])
def test_bad_arguments(sizes, kwargs, error):
    with pytest.raises(error, match="got"):
        MLP(sizes, **kwargs)


def test_demo_short_run_table_and_plot(tmp_path):
    pytest.importorskip("sklearn", reason="the demo's data needs scikit-learn (extra 'demo')")
    from nbbn.programs import demo
    logs = []
    results, timing = demo.run(lrs=(0.05, 1.0), steps=30, batch_size=32, eval_every=10,
                               log=logs.append)
    assert [(r["batch_norm"], r["lr"]) for r in results] == [
        (False, 0.05), (True, 0.05), (False, 1.0), (True, 1.0)]
    for r in results:
        assert r["eval_steps"] == [10, 20, 30] and len(r["loss"]) == 30
        assert all(0 <= a <= 1 for a in r["test_acc"])
        assert r["steps_to_target"] is None or r["steps_to_target"] in r["eval_steps"]
    # Same initial weights and batches: at step 1 (before any update) the plain
    # networks' losses agree across learning rates, and so do the BatchNorm ones.
    assert results[0]["loss"][0] == results[2]["loss"][0]
    assert results[1]["loss"][0] == results[3]["loss"][0]
    assert timing["train"] > 0 and timing["warm_up"] > 0 and len(logs) == 5
    table = demo.format_table(results)
    assert table.count("\n") == 5 and "MLP + BatchNorm | 1 |" in table
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (extra 'demo')")
    demo.plot(results, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_table_marks_divergence():
    from nbbn.programs import demo
    row = {"batch_norm": False, "lr": 9.0, "loss": [2.3, float("nan")], "eval_steps": [],
           "test_acc": [], "final_acc": float("nan"), "steps_to_target": None,
           "diverged_at": 2, "seconds": 0.1}
    assert "| MLP | 9 | diverged (step 2) | - | never | nan |" in demo.format_table([row])
    row.update(diverged_at=None, final_acc=0.5, eval_steps=[5, 10], test_acc=[0.75, 0.5],
               loss=[2.0, 1.0])
    assert "| MLP | 9 | 0.500 | 0.750 (5) | never | 1.500 |" in demo.format_table([row])


def test_demo_rejects_bad_options():
    from nbbn.programs import demo
    args = demo.add_arguments(argparse.ArgumentParser()).parse_args(["--steps", "0"])
    with pytest.raises(SystemExit, match="expected --steps >= 1"):
        demo.main(args)


def test_demo_command_line(tmp_path):
    pytest.importorskip("sklearn", reason="the demo's data needs scikit-learn (extra 'demo')")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "nbbn", "demo", "--steps", "10", "--lr", "0.1"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "| MLP + BatchNorm | 0.1 |" in done.stdout and "numba warm-up" in done.stdout


def test_demo_says_what_to_install(monkeypatch):
    import importlib.util

    from nbbn.programs import demo
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("sklearn", "matplotlib") else real(name, *a))
    args = demo.add_arguments(argparse.ArgumentParser()).parse_args(["--plot", "x.png"])
    with pytest.raises(SystemExit, match=r"sklearn and matplotlib not installed: pip install 'nbbn\[demo\]'"):
        demo.main(args)
