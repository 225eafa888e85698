"""The asv suite in asv_bench/ cannot rot: every benchmark body runs once,
on tiny shapes, under pytest (compilation in setup, as asv does it)."""
import itertools
import json
import pathlib
import re
import sys

import numpy as np
import pytest

ASV = pathlib.Path(__file__).resolve().parents[1] / "asv_bench"
sys.path.insert(0, str(ASV))
from benchmarks import batchnorm, fused, pipeline, startup  # noqa: E402

from nbbn.programs.bench_engines import ENGINES  # noqa: E402

TINY = [(4, 3, 5, 5), (16, 5), (2, 3, 70)]


def run_once(cls, *params):
    """setup, every time_ body, teardown; False if setup skips (NotImplementedError)."""
    bench = cls()
    try:
        bench.setup(*params)
    except NotImplementedError:
        return False
    for name in dir(bench):
        if name.startswith("time_"):
            getattr(bench, name)(*params)
    bench.teardown(*params)
    return True


def test_config_points_asv_at_the_repository():
    text = (ASV / "asv.conf.json").read_text()
    conf = json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.M))
    assert conf["repo"] == ".." and conf["benchmark_dir"] == "benchmarks"


def test_parameters_are_the_issue_targets_and_known_engines():
    assert set(batchnorm.ENGINES) <= set(ENGINES) and set(fused.ENGINES) <= set(ENGINES)
    assert {"nbbn", "numpy", "torch"} <= set(batchnorm.ENGINES)
    assert (64, 64, 112, 112) in batchnorm.SHAPES and (256, 64) in batchnorm.SHAPES
    assert set(batchnorm.OPERATIONS) == {"forward-train", "forward-eval", "backward"}
    assert set(batchnorm.DTYPES) == {"float32", "float64", "float16", "bfloat16"}


@pytest.mark.parametrize("engine,dtype,operation",
                         list(itertools.product(batchnorm.ENGINES, batchnorm.DTYPES,
                                                batchnorm.OPERATIONS)))
def test_batchnorm_bodies(engine, dtype, operation):
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    for shape in TINY:
        ran = run_once(batchnorm.BatchNorm, engine, shape, dtype, operation)
        if engine.startswith("torch") and not ran:
            pytest.importorskip("torch")  # skipped only because torch is missing
        assert ran


@pytest.mark.parametrize("engine", fused.ENGINES)
def test_fused_relu_bodies(engine):
    ran = run_once(fused.FusedRelu, engine, (4, 3, 5, 5))
    if engine == "torch" and not ran:
        pytest.importorskip("torch")
    assert ran


@pytest.mark.parametrize("engine", pipeline.Pipeline.params[0])
def test_pipeline_bodies(engine):
    from nbbn.programs.pipeline import BATCHES, STEPS
    assert pipeline.Pipeline.params == [list(STEPS), list(BATCHES)]
    ran = run_once(pipeline.Pipeline, engine, 8)
    if engine == "torch" and not ran:
        pytest.importorskip("torch")
    assert ran


def test_startup_bodies():
    bench = startup.Startup()
    values = [bench.track_import(), bench.track_first_call_warm_cache(),
              bench.track_first_call_cold_compile()]
    assert all(isinstance(v, float) and np.isfinite(v) and v > 0 for v in values)
