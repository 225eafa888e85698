"""GPU benchmark for ``python -m nbbn bench --device cuda``: nbbn's kernels
beside torch's (cuDNN) batch norm when torch has CUDA, and the card's copy
bandwidth (the roofline), measured in the same run on the same device.

* Kernel time (CUDA events around each call, medians): the training forward,
  the evaluation forward and the backward of every case.
* Copy bandwidth: the best of a device-to-device ``cuMemcpy``
  (``copy_to_device`` of a device array) and nbbn's grid-stride copy kernel
  over a large buffer (up to 2 GiB, a quarter of the free memory), read plus
  write counted.
* Roofline: the least traffic of each operation (training forward: ``x``
  read twice, ``y`` written; evaluation: ``x`` read, ``y`` written; backward:
  ``x`` and ``dy`` read twice, ``dx`` written) at the copy bandwidth, over the time.
* Per call (host wall clock of many calls, then one synchronization): what
  a user waits for, launches and Python included: the functional training
  forward, and a layer's forward plus backward (torch: with autograd).

Under numba's CUDA simulator everything runs once and nothing is timed (NaN).
"""
import math
import time

import numpy as np

from .. import BatchNorm
from ..functional import batch_norm, batch_norm_backward, native_batch_norm
from ..gpu import backend as _cuda

#: (shape, axis) of the default run: large, channels-last (torch's
#: channels_last memory format), (N, C), and mid-sized inputs.
DEFAULT_CASES = (((64, 64, 112, 112), 1), ((64, 112, 112, 64), -1), ((65536, 1024), 1),
                 ((256, 256, 28, 28), 1), ((32, 256, 28, 28), 1), ((4096, 1024), 1),
                 ((256, 64), 1))
#: (call, shape) of the per-call rows of the default run.
PER_CALL = (("functional train", (64, 128)), ("layer forward+backward", (64, 128)),
            ("layer forward+backward", (256, 512)), ("layer forward+backward", (8, 16, 32, 32)))
OPERATIONS = ("train", "eval", "backward")
#: Bytes moved per input byte, the least traffic of each operation.
TRAFFIC = {"train": 3, "eval": 2, "backward": 5}
#: Calls per per-call sample.
CALLS = 20


def _timer(cu, repeat):
    """``timed(fn)``: the median GPU seconds of ``fn()`` (CUDA events), after a
    warm-up call; NaN on the simulator (which runs ``fn`` once)."""
    def timed(fn):
        fn()  # compile, warm up
        if _cuda._simulated:
            return math.nan
        times = []
        for _ in range(repeat):
            start, stop = cu.event(), cu.event()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        return float(np.median(times))
    return timed


def copy_bandwidth(nbytes=None, repeat=10):
    """Device-to-device copy rates in bytes/s (read + write): ``memcpy``
    (``copy_to_device`` of a device array), ``kernel`` (nbbn's grid-stride
    copy) and ``best``, over ``nbytes`` (default: 2 GiB, or a quarter of the
    free memory if less)."""
    cu = _cuda.cuda()
    if nbytes is None:
        free = 4 << 20 if _cuda._simulated else cu.current_context().get_memory_info()[0]
        nbytes = min(2 << 30, free // 4)
    n = nbytes // 4
    src, dst = cu.device_array(n, np.float32), cu.device_array(n, np.float32)
    timed = _timer(cu, repeat)
    sm = 1 if _cuda._simulated else cu.get_current_device().MULTIPROCESSOR_COUNT
    grid = 32 * sm  # a few waves of the grid-stride loop
    rates = {"memcpy": 2 * 4 * n / timed(lambda: dst.copy_to_device(src)),
             "kernel": 2 * 4 * n / timed(
                 lambda: _cuda._launch(_cuda._channels().copy, grid, src, dst))}
    rates["best"] = max(rates.values())
    return rates


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def benchmark_case(shape, axis=1, dtype=np.float32, repeat=20):
    """Median GPU seconds of nbbn's and torch's (None without torch CUDA)
    training forward, evaluation forward and backward of a ``shape`` input
    with channels on ``axis``: ``{"nbbn": {op: s}, "torch": {op: s} or None}``."""
    cu = _cuda.cuda()
    rng = np.random.default_rng(0)
    c = shape[axis]
    x, dy = (cu.to_device(rng.standard_normal(shape).astype(dtype)) for _ in range(2))
    rm, rv, w, b = (cu.to_device(np.full(c, v, dtype)) for v in (0, 1, 1, 0))
    timed = _timer(cu, repeat)
    _, mean, invstd = native_batch_norm(x, None, None, w, b, True, 0.1, 1e-5, axis=axis)
    res = {"nbbn": {
        "train": timed(lambda: batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, axis=axis)),
        "eval": timed(lambda: batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, axis=axis)),
        "backward": timed(lambda: batch_norm_backward(dy, x, mean, invstd, w, True, axis=axis))},
        "torch": None}
    torch = _torch_cuda()
    if torch is not None:
        xt, dyt = (torch.as_tensor(v, device="cuda") for v in (x, dy))
        if axis != 1:  # channels last: torch's (N, C, ...) view of the same memory
            xt, dyt = (t.movedim(-1, 1) for t in (xt, dyt))
        rmt, rvt, wt, bt = (torch.as_tensor(v, device="cuda") for v in (rm, rv, w, b))
        xt.requires_grad_()
        f = torch.nn.functional.batch_norm
        yt = f(xt, rmt, rvt, wt, bt, True)
        res["torch"] = {
            "train": timed(lambda: f(xt, rmt, rvt, wt, bt, True)),
            "eval": timed(lambda: f(xt, rmt, rvt, wt, bt, False)),
            "backward": timed(lambda: torch.autograd.grad(yt, xt, dyt, retain_graph=True))}
    return res


def per_call(what, shape, dtype=np.float32, repeat=20):
    """Host seconds per call (``CALLS`` calls, then one synchronization;
    medians) of nbbn's and torch's ``what``: 'functional train' or 'layer
    forward+backward' on device arrays of ``shape`` (channels on axis 1).
    ``{"nbbn": s, "torch": s or None}``; NaN on the simulator."""
    cu = _cuda.cuda()
    rng = np.random.default_rng(0)
    c = shape[1]
    x, dy = (cu.to_device(rng.standard_normal(shape).astype(dtype)) for _ in range(2))
    rm, rv = cu.to_device(np.zeros(c, dtype)), cu.to_device(np.ones(c, dtype))
    if what == "functional train":
        def nbbn_call():
            batch_norm(x, rm, rv, None, None, True)
    else:
        layer = BatchNorm(c, dtype=dtype, device="cuda")

        def nbbn_call():
            layer(x)
            layer.backward(dy)
    res = {"nbbn": _host_seconds(nbbn_call, cu.synchronize, repeat), "torch": None}
    torch = _torch_cuda()
    if torch is not None:
        xt, dyt, rmt, rvt = (torch.as_tensor(v, device="cuda") for v in (x, dy, rm, rv))
        if what == "functional train":
            def torch_call():
                torch.nn.functional.batch_norm(xt, rmt, rvt, None, None, True)
        else:
            module = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d,
                      4: torch.nn.BatchNorm2d}.get(len(shape), torch.nn.BatchNorm3d)
            bn = module(c, device="cuda", dtype=xt.dtype)
            xt.requires_grad_()

            def torch_call():
                bn(xt).backward(dyt)
        res["torch"] = _host_seconds(torch_call, torch.cuda.synchronize, repeat)
    return res


def _host_seconds(fn, synchronize, repeat):
    for _ in range(3):
        fn()
    synchronize()
    if _cuda._simulated:
        return math.nan
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        synchronize()
        samples.append((time.perf_counter() - start) / CALLS)
    return float(np.median(samples))


def benchmark(cases=DEFAULT_CASES, dtype=np.float32, repeat=20, calls=PER_CALL):
    """The whole run: ``{"device", "dtype", "bandwidth", "cases", "per_call"}``,
    ``cases`` a list of :func:`benchmark_case` results with ``shape``,
    ``axis`` and the ``roofline`` fractions (nbbn's and torch's) added, and
    ``per_call`` a list of :func:`per_call` results with ``call`` and ``shape``."""
    cu = _cuda.cuda()
    name = "numba's CUDA simulator"
    if not _cuda._simulated:
        name = cu.get_current_device().name
        name = name.decode() if isinstance(name, bytes) else str(name)
    bandwidth = copy_bandwidth(repeat=repeat)
    results = []
    for shape, axis in cases:
        res = benchmark_case(tuple(shape), axis, dtype, repeat)
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        res["roofline"] = {
            engine: None if res[engine] is None else {
                op: TRAFFIC[op] * nbytes / bandwidth["best"] / t for op, t in res[engine].items()}
            for engine in ("nbbn", "torch")}
        results.append(dict(shape=tuple(shape), axis=axis, **res))
    rows = [dict(call=what, shape=tuple(shape), **per_call(what, tuple(shape), dtype, repeat))
            for what, shape in calls]
    return {"device": name, "dtype": np.dtype(dtype).name, "bandwidth": bandwidth,
            "cases": results, "per_call": rows}


def format_table(result):
    """Markdown tables of a :func:`benchmark` result."""
    def ms(t):
        return "-" if t is None or math.isnan(t) else f"{t * 1e3:.3f} ms"

    def us(t):
        return "-" if t is None or math.isnan(t) else f"{t * 1e6:.0f} us"

    def frac(v):
        return "-" if v is None or math.isnan(v) else f"{v:.2f}"

    bw = result["bandwidth"]
    gbs = ", ".join(f"{k} {'-' if math.isnan(v) else f'{v / 1e9:.0f}'} GB/s"
                    for k, v in bw.items())
    lines = [f"nbbn bench --device cuda, {result['dtype']}, on {result['device']}; "
             f"copy bandwidth: {gbs}", "",
             "GPU time (CUDA events, medians); roofline: the least traffic at the best copy "
             "bandwidth, over the time", "",
             "| shape | axis | operation | nbbn | torch | torch / nbbn | nbbn roofline "
             "| torch roofline |", "|---|---|---|---|---|---|---|---|"]
    for r in result["cases"]:
        for op in OPERATIONS:
            t_n = r["nbbn"][op]
            t_t = None if r["torch"] is None else r["torch"][op]
            ratio = "-" if t_t is None or math.isnan(t_n) else f"{t_t / t_n:.2f}x"
            roof_t = None if r["roofline"]["torch"] is None else r["roofline"]["torch"][op]
            lines.append(f"| {r['shape']} | {r['axis']} | {op} | {ms(t_n)} | {ms(t_t)} "
                         f"| {ratio} | {frac(r['roofline']['nbbn'][op])} | {frac(roof_t)} |")
    if result["per_call"]:
        lines += ["", "Per call (host wall clock, synchronized, medians)", "",
                  "| call | shape | nbbn | torch |", "|---|---|---|---|"]
        lines += [f"| {r['call']} | {r['shape']} | {us(r['nbbn'])} | {us(r['torch'])} |"
                  for r in result["per_call"]]
    return "\n".join(lines)


def main(shapes, dtype, repeat):
    """``python -m nbbn bench --device cuda``: every default case and the
    per-call rows, or the given (N, C, ...) ``shapes`` only; print the
    tables, return the result."""
    if shapes is None:
        result = benchmark(DEFAULT_CASES, dtype, repeat)
    else:
        result = benchmark([(tuple(s), 1) for s in shapes], dtype, repeat, calls=())
    print(format_table(result))
    return result
