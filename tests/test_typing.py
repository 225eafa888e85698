"""nbbn is a typed package (PEP 561): it ships ``py.typed``, and mypy checks a
user's program against its annotations, accepting the README's calls and
rejecting wrong ones."""
import importlib.metadata
import importlib.resources
import json
import re
import site
import textwrap
from pathlib import Path

import pytest

import nbbn


def _wheel_installs():
    """The file lists (RECORD) of nbbn's installs from a wheel, as
    ``/``-separated paths; editable installs and egg-info folders (a build
    left in the checkout) have none of their own."""
    for dist in importlib.metadata.distributions(name="nbbn"):
        direct_url = dist.read_text("direct_url.json")
        if dist.read_text("RECORD") is None or (
                direct_url and json.loads(direct_url).get("dir_info", {}).get("editable")):
            continue
        yield {str(f).replace("\\", "/") for f in dist.files or ()}


def test_py_typed_ships():
    assert importlib.resources.files("nbbn").joinpath("py.typed").is_file()
    for files in _wheel_installs():
        assert "nbbn/py.typed" in files


#: A user's program, as the README calls nbbn; checked with --strict.
GOOD = '''
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from typing_extensions import assert_type

import nbbn
from nbbn.functional import batch_norm_backward, native_batch_norm

bn = nbbn.BatchNorm(64)
x = np.random.rand(32, 64, 56, 56).astype(np.float32)
y = bn(x)
dx = bn.backward(np.ones_like(y))
bn.eval()
assert_type(bn.eval(), nbbn.BatchNorm)
assert_type(bn.to("cpu"), nbbn.BatchNorm)
assert_type(bn.device, Literal["cpu", "cuda"])
nbbn.BatchNorm(64, axis=-1, dtype=np.float64, activation="relu", virtual_batch_size=8)
y = nbbn.batch_norm(x, bn.running_mean, bn.running_var, bn.gamma, bn.beta, training=False)
out = np.empty_like(x)
bn.forward(x, out=out)
bn.backward(np.ones_like(x), out=np.empty_like(x))
if bn.grad_gamma is not None:
    bn.grad_gamma.sum()

y2, mean, invstd = native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5, axis=1)
dx2, dw, db = batch_norm_backward(np.ones_like(x), x, mean, invstd, None, True)

state = bn.state_dict()
assert_type(state, dict[str, npt.NDArray[Any]])
bn.load_state_dict(state)
bn.load_state_dict({"weight": [1.0] * 64, "bias": np.zeros(64), "running_mean": np.zeros(64),
                    "running_var": np.ones(64), "num_batches_tracked": 3})
bn.reset_running_stats()
bn.reset_parameters()
gamma: npt.NDArray[np.float32] | None = bn.gamma

rn = nbbn.BatchRenorm(64, rmax=3.0, dmax=5.0)
assert_type(rn.train(), nbbn.BatchRenorm)
rn.rmax = 2.0
assert_type(rn.dmax, float)
assert_type(rn.running_std, npt.NDArray[np.float64])

w, b = nbbn.fold_conv(bn, np.ones((64, 3, 3, 3), np.float32), None)
w2, b2 = nbbn.fold_linear(bn, np.ones((64, 10)), np.zeros(64))
assert_type(w2, npt.NDArray[np.floating])

with nbbn.precise_statistics([bn, rn]):
    bn(x)


def sync(comm: Any) -> nbbn.SyncBatchNorm:
    s = nbbn.SyncBatchNorm.from_batchnorm(bn, comm)
    assert_type(s.comm, Any | None)
    return nbbn.SyncBatchNorm(64, comm=comm).train(False)
'''

#: Wrong calls, each on a line marked ``# E``: mypy must report every one.
BAD = '''
import numpy as np

import nbbn

x = np.zeros((4, 3), np.float32)
bn = nbbn.BatchNorm("3")  # E
bn.forward(x, out=1.5)  # E
bn.to("gpu")  # E
nbbn.BatchNorm(3, axis=0)  # E
nbbn.batch_norm(x, activation="tanh")  # E
nbbn.BatchRenorm(3, device="tpu")  # E
nbbn.fold_linear(bn)  # E
bn.gamma.sum()  # E
'''


def _search_path():
    """Where mypy finds nbbn: None if the imported nbbn is installed in
    site-packages (found there through its py.typed, as a user's mypy
    finds it); else the folder holding it (a checkout, or an editable
    install, whose import hook mypy cannot follow)."""
    root = Path(nbbn.__file__).resolve().parent.parent
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    return None if root in installed else str(root)


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory):
    """mypy's errors on GOOD and BAD: ``{"good" or "bad": {line: [messages]}}``."""
    api = pytest.importorskip("mypy.api")
    folder = tmp_path_factory.mktemp("typing")
    for name, text in (("good", GOOD), ("bad", BAD)):
        (folder / f"{name}.py").write_text(textwrap.dedent(text))
    config = folder / "mypy.ini"
    path = _search_path()
    config.write_text("[mypy]\n" + (f"mypy_path = {path}\n" if path else ""))
    stdout, stderr, status = api.run([
        "--config-file", str(config), "--cache-dir", str(folder / "cache"),
        "--follow-imports=silent", "--strict", "--no-error-summary", "--hide-error-context",
        "--show-absolute-path", str(folder / "good.py"), str(folder / "bad.py")])
    assert status in (0, 1), stdout + stderr  # 2: mypy itself failed
    errors: dict = {"good": {}, "bad": {}}
    for line in stdout.splitlines():
        m = re.match(r"(.*)[/\\](good|bad)\.py:(\d+): (error|note): (.*)", line)
        assert m, line
        if m[4] == "error":
            errors[m[2]].setdefault(int(m[3]), []).append(m[5])
    return errors


def test_readme_program_type_checks(mypy_errors):
    assert mypy_errors["good"] == {}


def test_wrong_calls_are_reported(mypy_errors):
    lines = textwrap.dedent(BAD).splitlines()
    marked = {i for i, line in enumerate(lines, 1) if line.endswith("# E")}
    assert set(mypy_errors["bad"]) == marked, mypy_errors["bad"]
