"""``python -m nbbn bench`` on tiny shapes: the table, --json, --plot, bad
options; and the engine table it shares with asv, against the float64
reference of tests/naive.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import naive
from nbbn.programs import bench
from nbbn.programs.bench_engines import ENGINES, TRAFFIC, dtype_named, make_inputs

TINY = "4x3x5x5"
#: The script of the checks for a lent device machine.
DEVICE_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".ci",
                             "device")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nbbn", "bench", *args], capture_output=True,
                          text=True, timeout=600, env=None if env is None else {**os.environ, **env})


def test_cli_table_and_json(tmp_path):
    path = tmp_path / "bench.json"
    r = run_cli("--shapes", TINY, "16x5", "--ops", "forward-train", "forward-eval", "backward",
                "relu-step", "--repeat", "2", "--threads", "1", "--json", str(path))
    assert r.returncode == 0, r.stderr
    assert "[1/8] 4x3x5x5 forward-train" in r.stderr  # progress
    assert "| (4, 3, 5, 5) | forward-train |" in r.stdout
    assert "| (16, 5) | backward |" in r.stdout
    assert "Fused ReLU" in r.stdout
    result = json.loads(path.read_text())
    assert result["machine"]["threads"] == 1 and result["dtype"] == "float32"
    assert result["bandwidth_bytes_per_s"] > 0
    assert len(result["cases"]) == 8
    for case in result["cases"]:
        x_bytes = np.prod(case["shape"]) * 4
        assert case["traffic_bytes"] == TRAFFIC[case["operation"]] * x_bytes
        assert case["seconds"]["nbbn"] > 0 and len(case["samples"]["nbbn"]) == 2
        assert case["roofline"] == pytest.approx(
            case["traffic_bytes"] / case["bandwidth_bytes_per_s"] / case["seconds"]["nbbn"])
        others = {"numpy"} if case["operation"] != "relu-step" else {"nbbn+numpy-relu"}
        assert others <= set(case["speedup"])


def test_cli_float64_and_one_engine():
    r = run_cli("--shapes", "6x4", "--ops", "backward", "--dtype", "float64", "--engines", "nbbn",
                "--repeat", "1")
    assert r.returncode == 0, r.stderr
    assert "float64" in r.stdout and "| (6, 4) | backward |" in r.stdout


def test_cli_half_counts_two_byte_traffic(tmp_path):
    path = tmp_path / "bench.json"
    r = run_cli("--shapes", "8x3x6x6", "--ops", "forward-train", "backward", "--dtype", "float16",
                "--engines", "nbbn", "torch", "--repeat", "1", "--json", str(path))
    assert r.returncode == 0, r.stderr
    assert "float16 inputs (float32 parameters)" in r.stdout
    for case in json.loads(path.read_text())["cases"]:
        assert case["traffic_bytes"] == TRAFFIC[case["operation"]] * 8 * 3 * 6 * 6 * 2


def test_cli_channels_last(tmp_path):
    """--axis -1: the shapes are channels-last, for every engine (torch's
    channels_last tensors), said in the heading and the JSON."""
    path = tmp_path / "bench.json"
    r = run_cli("--shapes", "4x5x5x3", "--axis", "-1", "--ops", "forward-train", "backward",
                "--engines", "nbbn", "numpy", "--repeat", "1", "--json", str(path))
    assert r.returncode == 0, r.stderr
    assert "channels-last" in r.stdout and "| (4, 5, 5, 3) | backward |" in r.stdout
    result = json.loads(path.read_text())
    assert result["axis"] == -1 and [c["shape"] for c in result["cases"]] == [[4, 5, 5, 3]] * 2


def test_cli_thread_sweep(tmp_path):
    """--threads 1,2: a table for each count (threading layer and CPUs in the
    heading), the JSON's sweep, the scaling chart and each count's bars."""
    pytest.importorskip("matplotlib")
    path, png = tmp_path / "sweep.json", tmp_path / "scaling.png"
    r = run_cli("--shapes", "64x40", "--ops", "forward-train", "--engines", "nbbn", "numpy",
                "--repeat", "1", "--threads", "1,2", "--json", str(path), "--plot", str(png),
                env={"NUMBA_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("| (64, 40) | forward-train |") == 2
    assert ", 1 threads, float32, " in r.stdout and ", 2 threads, float32, " in r.stdout
    assert "numba threading layer " in r.stdout and " CPUs" in r.stdout
    sweep = json.loads(path.read_text())["sweep"]
    assert [s["machine"]["threads"] for s in sweep] == [1, 2]
    for p in (png, tmp_path / "scaling-1threads.png", tmp_path / "scaling-2threads.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    result = bench.run([((4, 3, 5), "forward-train"), ((4, 3, 5), "backward")],
                       engines=("nbbn",), threads=1, repeat=1)
    path = tmp_path / "roofline.png"
    bench.plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,message", [
    (["--threads", "0"], "--threads"), (["--threads", "1,x"], "--threads"),
    (["--threads", "1,100000"], "NUMBA_NUM_THREADS"), (["--repeat", "0"], "--repeat"),
    (["--shapes", "4x"], "shape"), (["--shapes", "7"], "shape"),
    (["--ops", "sideways"], "invalid choice"), (["--dtype", "int8"], "invalid choice"),
    (["--device", "cuda", "--dtype", "float16"], "float32 or float64"),
    (["--axis", "2"], "invalid choice"), (["--device", "cuda", "--axis", "-1"], "--axis -1")])
def test_bad_options_are_refused(args, message):
    r = run_cli(*args)
    assert r.returncode != 0 and message in r.stderr


def test_format_table_of_a_result():
    case = {"shape": [2, 3], "operation": "backward", "seconds": {"nbbn": 2e-6, "numpy": 4e-3},
            "speedup": {"numpy": 2000.0}, "roofline": 0.5}
    text = bench.format_table({"date": "2026-01-02T03:04:05", "machine": {"threads": 2},
                               "dtype": "float32", "bandwidth_bytes_per_s": 5e10,
                               "bandwidth_samples": [5e10], "cases": [case]})
    assert "2026-01-02, 2 threads, float32" in text and "50.0 GB/s" in text
    assert "| (2, 3) | backward | 2.0 us | 4.00 ms | 2000.00x | 0.50 |" in text


# --- the engine table against the float64 reference -------------------------

@pytest.mark.parametrize("engine", ["nbbn", "numpy", "torch", "torch-out"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (16, 5)])
def test_engines_compute_batch_norm(engine, shape):
    x, dy = make_inputs(shape, np.float64)
    try:
        e = ENGINES[engine](x, dy, threads=1)
    except NotImplementedError:
        pytest.importorskip("torch")
        raise
    w, b = e.weight, e.bias
    ref, rm, rv, mean, invstd = naive.batch_norm(x, np.zeros(shape[1]), np.ones(shape[1]), w, b,
                                                  True)
    y = np.asarray(e.operation("forward-train")())
    np.testing.assert_allclose(y, ref, rtol=1e-9, atol=1e-9)
    ref_eval = naive.batch_norm(x, rm, rv, w, b, False)[0]
    np.testing.assert_allclose(np.asarray(e.operation("forward-eval")()), ref_eval, rtol=1e-9,
                               atol=1e-9)
    dx, dw, db = (np.asarray(v).ravel() for v in e.operation("backward")())
    rdx, rdw, rdb = naive.batch_norm_backward(dy, x, mean, invstd, w, True)
    np.testing.assert_allclose(dx, rdx.ravel(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dw, rdw, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(db, rdb, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("engine", ["nbbn", "numpy", "torch", "torch-out"])
@pytest.mark.parametrize("shape", [(4, 5, 5, 3), (6, 7, 4)])
def test_engines_compute_channels_last_batch_norm(engine, shape):
    """``axis=-1``: every engine normalizes the last axis (torch through its
    channels_last tensors) and returns arrays shaped as the input."""
    x, dy = make_inputs(shape, np.float64)
    try:
        e = ENGINES[engine](x, dy, threads=1, axis=-1)
    except NotImplementedError:
        pytest.importorskip("torch")
        if engine == "torch-out" and len(shape) == 3:
            pytest.skip("torch's native_batch_norm.out miscomputes strided 3-D inputs")
        raise
    c, w, b = shape[-1], e.weight, e.bias
    ref, rm, rv, mean, invstd = naive.batch_norm(x, np.zeros(c), np.ones(c), w, b, True, axis=-1)
    np.testing.assert_allclose(e.operation("forward-train")(), ref, rtol=1e-9, atol=1e-9)
    ref_eval = naive.batch_norm(x, rm, rv, w, b, False, axis=-1)[0]
    np.testing.assert_allclose(e.operation("forward-eval")(), ref_eval, rtol=1e-9, atol=1e-9)
    dx, dw, db = e.operation("backward")()
    rdx, rdw, rdb = naive.batch_norm_backward(dy, x, mean, invstd, w, True, axis=-1)
    for got, want in ((dx, rdx), (dw, rdw), (db, rdb)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("engine", ["nbbn", "numpy", "torch", "torch-out"])
def test_engines_compute_half_batch_norm(engine, dtype):
    """Half inputs with float32 parameters: outputs in the input's dtype, within
    2 of its ulps (relative) of the float64 result of the same half values."""
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    dt = dtype_named(dtype)
    shape = (4, 3, 5, 5)
    x, dy = make_inputs(shape, dt)
    try:
        e = ENGINES[engine](x, dy, threads=1)
    except NotImplementedError:
        pytest.importorskip("torch")
        raise
    assert e.weight.dtype == np.float32 and e.running_var.dtype == np.float32
    x64, dy64, w, b = x.astype(np.float64), dy.astype(np.float64), e.weight, e.bias
    ref, rm, rv, mean, invstd = naive.batch_norm(x64, np.zeros(3), np.ones(3), w, b, True)
    tol = 2 * float(ml_eps(dt))
    y = e.operation("forward-train")()
    assert y.dtype == dt
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=tol, atol=tol)
    dx, dw, db = e.operation("backward")()
    rdx, rdw, rdb = naive.batch_norm_backward(dy64, x64, mean, invstd, w, True)
    assert dx.dtype == dt
    np.testing.assert_allclose(dx.astype(np.float64), rdx, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.ravel(dw), rdw, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.ravel(db), rdb, rtol=1e-3, atol=1e-3)


def ml_eps(dtype):
    """The machine epsilon of a float dtype, bfloat16 included."""
    if dtype.name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.finfo(dtype).eps
    return np.finfo(dtype).eps


@pytest.mark.parametrize("engine", ["nbbn", "nbbn+numpy-relu", "torch"])
def test_engines_compute_the_relu_step(engine):
    shape = (4, 3, 5, 5)
    x, dy = make_inputs(shape, np.float64)
    try:
        e = ENGINES[engine](x, dy, threads=1)
    except NotImplementedError:
        pytest.importorskip("torch")
        raise
    ref, _, _, mean, invstd = naive.batch_norm_relu(x, None, None, e.weight, e.bias, True)
    rdx, rdw, rdb = naive.batch_norm_relu_backward(dy, x, mean, invstd, ref, e.weight, True)
    dx, dw, db = (np.asarray(v) for v in e.operation("relu-step")())
    np.testing.assert_allclose(dx, rdx, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dw, rdw, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(db, rdb, rtol=1e-9, atol=1e-9)


# --- the pipeline case -------------------------------------------------------

def mlp_step_reference(batch):
    """dW1, dW2 of the pipeline's MLP step in float64 (batch statistics, ReLU)."""
    from nbbn.programs.pipeline import EPS, _inputs
    x, w1, w2, dy = (a.astype(np.float64) for a in _inputs(batch))
    saved = []
    a = x
    for w in (w1, w2):
        z = a @ w
        y = naive.batch_norm(z, training=True, eps=EPS)
        saved.append((a, z, y))
        a = np.maximum(y[0], 0)
    grads, g = [], dy
    for w, (a_in, z, (y, _, _, mean, invstd)) in zip((w2, w1), reversed(saved)):
        dz = naive.batch_norm_backward(np.where(y > 0, g, 0), z, mean, invstd)[0]
        grads.append(a_in.T @ dz)
        g = dz @ w.T
    return grads[1], grads[0]


@pytest.mark.parametrize("engine", ["nbbn", "numpy", "torch"])
def test_pipeline_steps_compute_the_mlp_gradients(engine):
    from nbbn.programs.pipeline import make_step
    try:
        step = make_step(engine, 32)
    except NotImplementedError:
        pytest.importorskip("torch")
        raise
    for got, expected in zip(step(), mlp_step_reference(32)):
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_matmul_floor_is_the_steps_matmuls():
    from nbbn.programs.pipeline import STEPS, FLOORS, _inputs, make_step
    assert FLOORS == ("matmuls",) and list(STEPS)[-1] == "matmuls"
    x, w1, w2, dy = (a.astype(np.float64) for a in _inputs(16))
    a1 = x @ w1
    expected = (x.T @ (dy @ w2.T), a1.T @ dy)
    for got, want in zip(make_step("matmuls", 16)(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_cli_pipeline(tmp_path):
    path = tmp_path / "pipeline.json"
    r = run_cli("--pipeline", "8", "16", "--repeat", "2", "--threads", "1", "--json", str(path))
    assert r.returncode == 0, r.stderr
    assert "Pipeline: one training step" in r.stdout and "numba threading layer" in r.stdout
    assert "| 8 |" in r.stdout and "| 16 |" in r.stdout
    assert "| (" not in r.stdout  # no per-call cases without --shapes/--ops
    result = json.loads(path.read_text())["pipeline"]
    assert [c["batch"] for c in result["cases"]] == [8, 16]
    assert " matmuls |" in r.stdout and "nbbn - matmuls" in r.stdout
    for case in result["cases"]:
        assert len(case["samples"]["nbbn"]) == 2 and case["seconds"]["nbbn"] > 0
        assert "numpy" in case["speedup"] and "matmuls" not in case["speedup"]
        s = case["seconds"]
        assert case["over_matmuls"] == {"nbbn": s["nbbn"] - s["matmuls"],
                                         "numpy": s["numpy"] - s["matmuls"]}


def test_device_script_keeps_to_its_budget(tmp_path):
    """``.ci/device`` with no time left: the machine's heading, then every stage
    skipped (nothing compiled or measured), and no result files but its log."""
    (tmp_path / ".ci").mkdir()
    script = tmp_path / ".ci" / "device"
    script.write_text(open(DEVICE_SCRIPT).read())
    env = {**os.environ, "OUT": str(tmp_path / "out"),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    r = subprocess.run(["bash", str(script), "0"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "out" / "log.md").read_text()
    assert log.startswith("# .ci/device") and "CPUs" in log and "numba " in log
    assert "compiling: skipped" in log
    for stage in ("float32-t", "pipeline-t", "float16", "bfloat16", "scaling", "GPU tests"):
        assert f"- {stage}" in log and "skipped" in log.split(f"- {stage}")[1].splitlines()[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["log.md"]


@pytest.mark.parametrize("budget", ["5m", "-3", "fast"])
def test_device_script_refuses_a_budget_that_is_no_count_of_seconds(tmp_path, budget):
    r = subprocess.run(["bash", DEVICE_SCRIPT, budget],
                       capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path)},
                       timeout=60)
    assert r.returncode == 2 and "whole seconds" in r.stderr and budget in r.stderr
    assert not any(tmp_path.iterdir())
