"""GPU benchmark for ``python -m nbbn bench --device cuda``: nbbn's kernels
against torch's cuDNN batch norm and a copy kernel (the bandwidth roofline),
timed with CUDA events on the same device in the same run."""
import numpy as np

from ..functional import batch_norm, batch_norm_backward, native_batch_norm
from ..gpu import backend as _cuda


def benchmark(shape=(64, 64, 112, 112), dtype=np.float32, repeat=20):
    """Median GPU seconds of the training forward and of the backward of a
    ``shape`` input, with ``torch.nn.functional.batch_norm`` (cuDNN) beside
    them when torch has CUDA, and the bandwidth of a copy kernel in the same run.

    Returns a dict: ``nbbn_forward``, ``nbbn_backward``, ``torch_forward``,
    ``torch_backward`` (None without torch CUDA), ``copy_bandwidth`` (bytes/s),
    ``forward_roofline`` and ``backward_roofline``: the fraction of the copy
    bandwidth reached, counting the least traffic of two passes (forward: x
    read twice, y written; backward: x and dy read twice, dx written).
    """
    cu = _cuda.cuda()
    rng = np.random.default_rng(0)
    x, dy = (cu.to_device(rng.standard_normal(shape).astype(dtype)) for _ in range(2))
    rm, rv, w, b = (cu.to_device(np.full(shape[1], v, dtype)) for v in (0, 1, 1, 0))
    flat, dst = x.reshape(x.size), cu.device_array(x.size, dtype)

    def timed(fn):
        fn()  # compile, warm up
        times = []
        for _ in range(repeat):
            start, stop = cu.event(), cu.event()
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        return float(np.median(times))

    _, mean, invstd = native_batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    grid = -(-x.size // (_cuda.THREADS_PER_BLOCK * 8))
    t_copy = timed(lambda: _cuda._channels().copy[grid, _cuda.THREADS_PER_BLOCK](flat, dst))
    res = {"nbbn_forward": timed(lambda: batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)),
           "nbbn_backward": timed(lambda: batch_norm_backward(dy, x, mean, invstd, w, True)),
           "copy_bandwidth": _ratio(2 * x.nbytes, t_copy),
           "torch_forward": None, "torch_backward": None}
    res["forward_roofline"] = _ratio(3 * x.nbytes / res["copy_bandwidth"], res["nbbn_forward"])
    res["backward_roofline"] = _ratio(5 * x.nbytes / res["copy_bandwidth"],
                                      res["nbbn_backward"])
    try:
        import torch
    except ImportError:
        return res
    if torch.cuda.is_available():
        xt, dyt, rmt, rvt, wt, bt = (torch.as_tensor(v, device="cuda")
                                     for v in (x, dy, rm, rv, w, b))
        xt.requires_grad_()
        f = torch.nn.functional.batch_norm
        res["torch_forward"] = timed(lambda: f(xt, rmt, rvt, wt, bt, True))
        yt = f(xt, rmt, rvt, wt, bt, True)
        res["torch_backward"] = timed(lambda: yt.backward(dyt, retain_graph=True))
    return res


def _ratio(a, b):
    return a / b if b else float("nan")  # the simulator times everything as 0


def format_table(results, dtype):
    """A Markdown table of :func:`benchmark` results, ``{shape: result}``."""
    def ms(t):
        return "-" if t is None else f"{t * 1e3:.3f} ms"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{_ratio(a, b):.2f}x"

    lines = [f"nbbn bench --device cuda, {np.dtype(dtype).name}, GPU times (CUDA events, medians)",
             "", "| shape | operation | nbbn | torch (cuDNN) | vs torch | copy bandwidth | roofline |",
             "|---|---|---|---|---|---|---|"]
    for shape, r in results.items():
        for op in ("forward", "backward"):
            lines.append(f"| {shape} | {'forward-train' if op == 'forward' else op} "
                         f"| {ms(r['nbbn_' + op])} | {ms(r['torch_' + op])} "
                         f"| {ratio(r['torch_' + op], r['nbbn_' + op])} "
                         f"| {r['copy_bandwidth'] / 1e9:.1f} GB/s | {r[op + '_roofline']:.2f} |")
    return "\n".join(lines)


def main(shapes, dtype, repeat):
    """``python -m nbbn bench --device cuda``: print the table, return the results."""
    results = {tuple(shape): benchmark(tuple(shape), dtype, repeat) for shape in shapes}
    print(format_table(results, dtype))
    return results
