"""PyTorch's own batch-norm test cases, run through nbbn.

The samples come from the torch wheel: the OpInfo entries of
``torch.testing._internal.common_methods_invocations.op_db`` and the
ModuleInfo entries of ``torch.testing._internal.common_modules.module_db``,
collected on CPU for float32 and float64. What torch computes for a sample is
what nbbn must compute: a new torch release with new cases adds tests here.

Left out: the OpInfo variant ``nn.functional.batch_norm`` / ``without_cudnn``
(the same samples; torch runs it on CUDA only, its CPU dtypes are empty).
"""
import numpy as np
import pytest

import nbbn
from conftest import ATOL, DTYPES, RTOL

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}
NUMPY_DTYPE = {v: np.dtype(k) for k, v in TORCH_DTYPE.items()}


def _legit(x, w, b, *rest):
    """``_native_batch_norm_legit``'s arguments: with running statistics
    (rm, rv, training, momentum, eps) or without (training, momentum, eps)."""
    rm, rv = rest[:2] if len(rest) == 5 else (None, None)
    return (x, rm, rv, w, b) + rest[-3:]


#: Each op's arguments in the order of nbbn.functional.native_batch_norm, which is
#: torch.nn.functional.batch_norm's (not torch.native_batch_norm's, which puts
#: weight and bias first): (x, running_mean, running_var, weight, bias, training,
#: momentum, eps).
CANONICAL = {
    "nn.functional.batch_norm":
        lambda x, rm=None, rv=None, w=None, b=None, training=False, momentum=0.1, eps=1e-5:
        (x, rm, rv, w, b, training, momentum, eps),
    "native_batch_norm": lambda x, w, b, rm, rv, *rest: (x, rm, rv, w, b) + rest,
    "_native_batch_norm_legit": _legit,
    # always training
    "_batch_norm_with_update":
        lambda x, w, b, rm, rv, momentum, eps: (x, rm, rv, w, b, True, momentum, eps),
}


def _native(op):
    """nbbn.functional.native_batch_norm taking ``op``'s arguments."""
    return lambda x, *args, **kwargs: nbbn.functional.native_batch_norm(
        *CANONICAL[op](x, *args, **kwargs))


#: nbbn's function for each op, taking the op's arguments.
NBBN = {op: _native(op) for op in CANONICAL}
NBBN["nn.functional.batch_norm"] = nbbn.batch_norm

#: The input dimensions of each torch module (nbbn.BatchNorm takes them all, axis=1).
MODULE_NDIM = {torch.nn.BatchNorm1d: (2, 3), torch.nn.BatchNorm2d: (4,),
               torch.nn.BatchNorm3d: (5,)}


def convert(obj, tensor):
    """``obj`` with each tensor replaced by ``tensor(t)``, torch dtypes by
    NumPy's and devices by ``'cpu'``, through tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return tensor(obj)
    if isinstance(obj, torch.dtype):
        return NUMPY_DTYPE[obj]
    if isinstance(obj, torch.device):
        return "cpu"
    if isinstance(obj, (tuple, list)):
        return type(obj)(convert(v, tensor) for v in obj)
    if isinstance(obj, dict):
        return {k: convert(v, tensor) for k, v in obj.items()}
    return obj


def to_numpy(obj):
    """NumPy copies of the tensors in ``obj`` (updating one leaves torch's alone)."""
    return convert(obj, lambda t: t.detach().numpy().copy())


def fresh(obj):
    """Fresh copies of the tensors in ``obj``, as leaves requiring grad as before."""
    return convert(obj, lambda t: t.detach().clone().requires_grad_(t.requires_grad))


def assert_close(actual, expected, dtype, what):
    """``actual`` (NumPy) equals ``expected`` (tensor) within the dtype's tolerance."""
    assert actual is not None, f"{what}: nbbn gave None, torch {expected!r}"
    expected = expected.detach().numpy()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=RTOL[dtype], atol=ATOL[dtype],
                               err_msg=what)


def upstream(y):
    """A random gradient of the output ``y`` (NumPy), seeded."""
    return np.random.default_rng(0).standard_normal(y.shape).astype(y.dtype)


def _shape(shape):
    return "x".join(map(str, shape))


# ---------------------------------------------------------------- functional


def op_samples():
    """``pytest.param(op_name, dtype, sample)`` for every OpInfo sample."""
    params = []
    for info in op_db:
        if info.name not in CANONICAL or info.variant_test_name:
            continue
        for dtype in DTYPES:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                samples = list(info.sample_inputs("cpu", TORCH_DTYPE[dtype], requires_grad=True))
            for i, s in enumerate(samples):
                x, rm, _, w, b, training, momentum, eps = CANONICAL[info.name](
                    s.input, *s.args, **s.kwargs)
                name = (f"{info.name}-{np.dtype(dtype).name}-{i:02d}-{_shape(x.shape)}-"
                        f"{'train' if training else 'eval'}-momentum={momentum}-eps={eps}"
                        + ("-noweight" if w is None else "") + ("-nobias" if b is None else "")
                        + ("-nostats" if rm is None else ""))
                params.append(pytest.param(info, dtype, s, id=name))
    return params


def torch_op(info, sample, dy):
    """Run torch's op on fresh copies of ``sample``: the output, the updated
    running statistics, the saved mean and invstd (None for
    ``nn.functional.batch_norm``) and the gradients of x, weight and bias."""
    x, args, kwargs = fresh((sample.input, sample.args, sample.kwargs))
    out = info.op(x, *args, **kwargs)
    y, saved = (out[0], out[1:3]) if isinstance(out, tuple) else (out, None)
    x, rm, rv, w, b = CANONICAL[info.name](x, *args, **kwargs)[:5]
    if y.requires_grad:
        y.backward(torch.from_numpy(dy))
    leaves = ((x, "dx"), (w, "dweight"), (b, "dbias"))
    return y, (rm, rv), saved, [(t, k) for t, k in leaves if t is not None and t.requires_grad]


@pytest.mark.parametrize("info,dtype,sample", op_samples())
def test_op_sample(info, dtype, sample):
    """nbbn's forward, running statistics and gradients equal torch's on the
    sample, in the sample's mode (training or eval)."""
    x, args, kwargs = to_numpy((sample.input, sample.args, sample.kwargs))
    _, rm, rv, w, _, training, _, eps = CANONICAL[info.name](x, *args, **kwargs)
    rm0, rv0 = to_numpy(CANONICAL[info.name](sample.input, *sample.args, **sample.kwargs)[1:3])
    out = NBBN[info.name](x, *args, **kwargs)
    y = out[0] if isinstance(out, tuple) else out
    dy = upstream(y)
    y_t, running_t, saved_t, grads_t = torch_op(info, sample, dy)

    assert_close(y, y_t, dtype, "output")
    assert y.dtype == dtype
    for got, want, name in zip((rm, rv), running_t, ("running_mean", "running_var")):
        if want is not None:
            assert_close(got, want, dtype, name)
    if saved_t is not None and training:  # in eval torch saves empty tensors
        for got, want, name in zip(out[1:], saved_t, ("save_mean", "save_invstd")):
            assert_close(got, want, dtype, name)
    if grads_t:
        # the statistics the forward normalized with, from the running ones before it
        stats = (None, None) if training else (rm0, rv0)
        _, mean, invstd = nbbn.functional.native_batch_norm(x, *stats, None, None, training,
                                                            0.1, eps)
        got = dict(zip(("dx", "dweight", "dbias"),
                       nbbn.functional.batch_norm_backward(dy, x, mean, invstd, w, training)))
        for t, name in grads_t:
            assert_close(got[name], t.grad, dtype, name)


# ------------------------------------------------------------------- modules


def module_samples(errors=False):
    """``pytest.param(module_info, dtype, module_input)`` for every
    ModuleInfo input of torch's BatchNorm1d/2d/3d (its error inputs if
    ``errors``)."""
    params = []
    for info in module_db:
        if info.module_cls not in MODULE_NDIM:
            continue
        inputs = info.module_error_inputs_func if errors else info.module_inputs_func
        for dtype in DTYPES:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                samples = list(inputs(info, device="cpu", dtype=TORCH_DTYPE[dtype],
                                      requires_grad=True, training=True))
            for i, s in enumerate(samples):
                m = s.module_error_input if errors else s
                c = m.constructor_input
                ctor = ",".join([repr(a) for a in c.args]
                                + [f"{k}={v!r}" for k, v in c.kwargs.items()])
                name = "-".join(filter(None, (
                    info.module_cls.__name__, np.dtype(dtype).name, str(i), m.desc, f"({ctor})",
                    _shape(m.forward_input.args[0].shape))))
                params.append(pytest.param(info, dtype, s, id=name))
    return params


def build(module_cls, dtype, constructor_input):
    """``module_cls`` (torch's) or nbbn.BatchNorm, built from a ModuleInfo constructor input."""
    args, kwargs = constructor_input.args, constructor_input.kwargs
    if module_cls is nbbn.BatchNorm:
        return nbbn.BatchNorm(*to_numpy(args), **to_numpy(kwargs), dtype=dtype, device="cpu")
    return module_cls(*args, **kwargs, device="cpu", dtype=TORCH_DTYPE[dtype])


@pytest.mark.parametrize("info,dtype,sample", module_samples())
def test_module_sample(info, dtype, sample):
    """nbbn.BatchNorm built with the torch module's arguments gives torch's
    outputs, gradients and state, in a training step then an eval step."""
    assert sample.forward_input.args[0].ndim in MODULE_NDIM[info.module_cls]
    module = build(info.module_cls, dtype, sample.constructor_input)
    layer = build(nbbn.BatchNorm, dtype, sample.constructor_input)
    layer.load_state_dict(to_numpy(module.state_dict()))
    for training in (True, False):
        module.train(training)
        layer.train(training)
        args, kwargs = fresh((sample.forward_input.args, sample.forward_input.kwargs))
        y_t = module(*args, **kwargs)
        y = layer(*to_numpy(args), **to_numpy(kwargs))
        mode = "train" if training else "eval"
        assert_close(y, y_t, dtype, f"{mode} output")
        dy = upstream(y)
        y_t.backward(torch.from_numpy(dy))
        assert_close(layer.backward(dy), args[0].grad, dtype, f"{mode} dx")
        for param, grad, name in ((module.weight, layer.grad_gamma, "grad_gamma"),
                                  (module.bias, layer.grad_beta, "grad_beta")):
            if param is None:
                assert grad is None, f"{mode} {name}: torch has no parameter"
            else:
                assert_close(grad, param.grad, dtype, f"{mode} {name}")
        module.zero_grad(set_to_none=True)
        state, state_t = layer.state_dict(), module.state_dict()
        assert state.keys() == state_t.keys()
        for k, v in state_t.items():
            if k == "num_batches_tracked":
                assert int(state[k]) == int(v), f"{mode} {k}"
            else:
                assert_close(state[k], v, dtype, f"{mode} {k}")


@pytest.mark.parametrize("info,dtype,sample", module_samples(errors=True))
def test_module_error_sample(info, dtype, sample):
    """An input torch refuses (construction or a training forward) nbbn
    refuses with the same exception type (possibly already on construction)."""
    bad = sample.module_error_input
    with pytest.raises(sample.error_type):
        layer = build(nbbn.BatchNorm, dtype, bad.constructor_input)
        layer(*to_numpy(bad.forward_input.args))
