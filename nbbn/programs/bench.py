"""``python -m nbbn bench``: is nbbn fast here?

Measures this machine's memory bandwidth (a Numba kernel streaming
``y = a * x + b`` over buffers far larger than the last-level cache), then,
for each shape and operation, the median time of nbbn, of a plain NumPy
batch norm and of PyTorch (when installed), the speedups, and the fraction of
the memory roofline nbbn reaches: traffic / bandwidth / nbbn time, with the
traffic of the minimal passes over memory (:data:`TRAFFIC`).

nbbn writes into preallocated outputs (``out=``, as a training loop would);
NumPy and torch are called as their users call them, allocating their
outputs (``--engines ... torch-out`` adds torch writing into preallocated
outputs too). The engines live in :mod:`nbbn.programs.bench_engines`, shared with
the asv suite in ``asv_bench/``.

``--threads 1,2,4,8`` sweeps thread counts (numba's and torch's): a table
for each, with the threading layer and the CPUs in its heading, and with
``--plot`` a chart of time against threads. Thread counts above
``NUMBA_NUM_THREADS`` (by default the CPU count) need it set higher.
"""
import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from .bench_engines import (DEFAULT_ENGINES, DTYPES, ENGINES, OPERATIONS, TRAFFIC, dtype_named,
                            make_inputs)
from .pipeline import BATCHES, FLOORS, STEPS

__all__ = ["DEFAULT_CASES", "BandwidthProbe", "measure_bandwidth", "calibrate", "sample",
           "time_call", "run", "run_pipeline", "format_table", "first_call_seconds", "startup_times", "plot",
           "plot_scaling", "add_arguments", "main"]

BASIC_OPS = ("forward-train", "forward-eval", "backward")
DEFAULT_SHAPES = ((64, 64, 112, 112), (32, 256, 28, 28), (4096, 1024), (8, 16, 32, 32),
                  (256, 64))
#: (shape, operation) of the default run: every basic operation on every
#: default shape, and the fused ReLU training step on the largest.
DEFAULT_CASES = tuple((s, op) for s in DEFAULT_SHAPES for op in BASIC_OPS) + (
    ((64, 64, 112, 112), "relu-step"),)
#: A sample lasts at least this long (calls are repeated within it).
MIN_SAMPLE_S = 0.02
#: Calls slower than this get only 3 samples, whatever ``repeat`` says.
SLOW_CALL_S = 0.25


class BandwidthProbe:
    """Memory bandwidth in bytes/s: read + write of ``y = a * x + b`` over
    float32 buffers of ``nbytes`` each (default: 4x the last-level cache, at
    least 256 MiB, at most 2 GiB), with the kernel loop and stores nbbn's
    affine pass uses on arrays that size. :meth:`sample` times one pass."""

    def __init__(self, nbytes=None):
        from .._engine import PLANE_CHUNK, kernels, last_level_cache_bytes, layout_of
        nbytes = nbytes or min(2 << 30, max(256 << 20, 4 * last_level_cache_bytes()))
        self.x = np.ones(nbytes // 4, dtype=np.float32)
        self.y = np.empty_like(self.x)
        stream = layout_of((1, 1, self.x.size), 1, 4).stream
        self.args = (self.x, 1.5, 0.5, PLANE_CHUNK, stream, self.y)
        self.kernel = kernels().bandwidth_probe
        self.kernel(*self.args)  # compile (or load), fault the pages in

    def sample(self):
        t = time.perf_counter()
        self.kernel(*self.args)
        return 2 * self.x.nbytes / (time.perf_counter() - t)


def measure_bandwidth(repeat=9, nbytes=None):
    """Median bandwidth of ``repeat`` probes (see :class:`BandwidthProbe`):
    ``(median, samples)`` in bytes/s."""
    probe = BandwidthProbe(nbytes)
    samples = [probe.sample() for _ in range(repeat)]
    return float(np.median(samples)), samples


def calibrate(fn):
    """``(calls per sample, seconds of the first call)``: enough calls of
    ``fn()`` to last ``MIN_SAMPLE_S``. The first call compiles or loads
    kernels and faults pages in; it is not a sample."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    t = time.perf_counter()
    fn()
    again = time.perf_counter() - t
    return max(1, math.ceil(MIN_SAMPLE_S / max(again, 1e-7))), first


def sample(fn, loops):
    """Seconds per call of ``fn()`` over ``loops`` calls."""
    t = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - t) / loops


def time_call(fn, repeat):
    """Median seconds per call of ``fn()`` (see :func:`calibrate`):
    ``(median, samples, calls_per_sample)``."""
    loops, first = calibrate(fn)
    samples = [sample(fn, loops) for _ in range(min(repeat, 3) if first > SLOW_CALL_S else repeat)]
    return float(np.median(samples)), samples, loops


def run(cases=DEFAULT_CASES, dtype=np.float32, engines=DEFAULT_ENGINES, threads=None,
        repeat=7, progress=None, axis=1):
    """Measure ``cases`` ((shape, operation) pairs); return a dict (the JSON).

    For each case the engines are timed in rounds, each round one sample of
    every engine and one of the bandwidth probe, so that a machine whose
    speed drifts (a shared host) shifts all of them alike; each figure is
    the median of its samples, the roofline uses the case's own bandwidth.
    Engines whose first call takes over ``SLOW_CALL_S`` get 3 samples.
    ``threads`` sets ``numba.set_num_threads`` and ``torch.set_num_threads``
    (default: numba's). ``progress(text)`` is called as the run goes.
    ``axis``: the channels' axis of every shape (-1: channels-last, which
    torch takes as its ``channels_last`` tensors).
    """
    import numba
    threads = threads or numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(threads)
    say = progress or (lambda text: None)
    if cases:
        say("memory bandwidth probe")
    probe = BandwidthProbe() if cases else None
    dtype = dtype_named(dtype)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": _machine(threads), "dtype": dtype.name, "repeat": repeat,
              "axis": axis, "cases": []}
    all_bw = []
    for i, (shape, op) in enumerate(cases):
        say(f"[{i + 1}/{len(cases)}] {'x'.join(map(str, shape))} {op}")
        x, dy = make_inputs(shape, dtype)
        timed = {}
        for name in engines:
            if op not in ENGINES[name].operations:
                continue
            try:
                fn = ENGINES[name](x, dy, threads=threads, axis=axis).operation(op)
            except NotImplementedError:  # torch not installed, or an input it does not take
                continue
            loops, first = calibrate(fn)
            timed[name] = (fn, loops, 3 if first > SLOW_CALL_S else repeat, [],
                           ENGINES[name].settle_s)
        bw = []
        for r in range(repeat):
            bw.append(probe.sample())
            for fn, loops, rounds, samples, settle in timed.values():
                if r < rounds:
                    samples.append(sample(fn, loops))
                    time.sleep(settle)
        all_bw += bw
        case = {"shape": list(shape), "operation": op, "traffic_bytes": TRAFFIC[op] * x.nbytes,
                "bandwidth_bytes_per_s": float(np.median(bw)),
                "seconds": {k: float(np.median(v[3])) for k, v in timed.items()},
                "samples": {k: v[3] for k, v in timed.items()}, "bandwidth_samples": bw}
        _derive(case, case["bandwidth_bytes_per_s"])
        result["cases"].append(case)
        del timed, x, dy
    result["bandwidth_bytes_per_s"] = float(np.median(all_bw)) if all_bw else None
    result["bandwidth_samples"] = all_bw
    return result


def run_pipeline(batches=BATCHES, engines=tuple(STEPS), threads=None, repeat=7,
                 progress=None):
    """Time one MLP training step (:mod:`nbbn.programs.pipeline`) per engine and
    batch size; return a dict (the JSON's ``pipeline``).

    Each engine runs in fresh processes of its own (two, one after the other
    engine's, each taking half the samples): a training step leaves thread
    pools and library state behind (after a torch step, NumPy's matmuls in the
    same process ran 1.6x faster here), and a user's loop has one of them only.
    """
    say = progress or (lambda text: None)
    samples = {e: {b: [] for b in batches} for e in engines}
    report = {}
    for half in (repeat - repeat // 2, repeat // 2):
        for name in engines:
            if not half:
                continue
            say(f"pipeline: {name}, batches {', '.join(map(str, batches))} (a fresh process)")
            got = _pipeline_process(name, batches, half, threads)
            if got is None:  # torch not installed
                samples.pop(name, None)
                continue
            for b, values in got["samples"].items():
                samples[name][int(b)] += values
            report[name] = got["threading"]
    cases = []
    for b in batches:
        seconds = {e: float(np.median(samples[e][b])) for e in samples}
        case = {"batch": b, "seconds": seconds, "samples": {e: samples[e][b] for e in samples}}
        if "nbbn" in seconds:
            case["speedup"] = {k: v / seconds["nbbn"] for k, v in seconds.items()
                               if k != "nbbn" and k not in FLOORS}
        for floor in FLOORS:
            if floor in seconds:  # what the NumPy steps spend on batch norm
                case[f"over_{floor}"] = {k: seconds[k] - seconds[floor]
                                         for k in ("nbbn", "numpy") if k in seconds}
        cases.append(case)
    return {"threading": report.get("nbbn", ""), "cases": cases}


_PIPELINE = """
import json, sys, time
from nbbn.programs.bench import calibrate, sample
from nbbn.programs.pipeline import make_step, threading_report
engine, batches, repeat, threads = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), \
    int(sys.argv[4]) or None
out = {"samples": {}}
try:
    steps = {b: make_step(engine, int(b), threads) for b in batches}
except NotImplementedError:
    print("null"); sys.exit()
for b, fn in steps.items():
    loops, _ = calibrate(fn)
    out["samples"][b] = [sample(fn, loops) for _ in range(repeat)]
out["threading"] = threading_report()
print(json.dumps(out))
"""


def _pipeline_process(engine, batches, repeat, threads):
    """Samples of ``engine``'s training step, measured in a new interpreter."""
    env = dict(os.environ)
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    if threads:
        env["NUMBA_NUM_THREADS"] = str(threads)
    done = subprocess.run([sys.executable, "-c", _PIPELINE, engine, ",".join(map(str, batches)),
                           str(repeat), str(threads or 0)], capture_output=True, text=True,
                          env=env, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def _derive(case, bandwidth):
    """Speedups of nbbn over the others and its roofline fraction."""
    secs = case["seconds"]
    if "nbbn" not in secs:
        return
    case["speedup"] = {k: v / secs["nbbn"] for k, v in secs.items() if k != "nbbn"}
    case["roofline"] = case["traffic_bytes"] / bandwidth / secs["nbbn"]


def _machine(threads):
    import numba
    info = {"platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "usable_cpus": _usable_cpus(), "threads": threads,
            "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__}
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        info["threading_layer"] = numba.threading_layer()
    except ValueError:  # no parallel kernel has run
        pass
    return info


def _usable_cpus():
    """CPUs this process may run on (its affinity), or None where unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _fmt_time(s):
    if s is None:
        return "-"
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def _fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}x"


def _table(cases, engines, labels):
    others = [e for e in engines if e != "nbbn"]
    head = ["shape"] + (["operation"] if labels is None else []) + [
        labels.get(e, e) if labels else e for e in engines] + [
        f"vs {labels.get(e, e) if labels else e}" for e in others] + ["roofline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        s, r = c["seconds"], c.get("speedup", {})
        row = [str(tuple(c["shape"]))] + ([c["operation"]] if labels is None else [])
        row += [_fmt_time(s.get(e)) for e in engines] + [_fmt_ratio(r.get(e)) for e in others]
        row.append(f"{c['roofline']:.2f}" if "roofline" in c else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def format_table(result):
    """The result as Markdown tables (the basic operations, then the fused ReLU)."""
    bw = result["bandwidth_bytes_per_s"]
    m = result["machine"]
    head = f"nbbn bench, {result['date'][:10]}, {m['threads']} threads, {result['dtype']}"
    if result["dtype"] in ("float16", "bfloat16"):
        head += " inputs (float32 parameters)"
    if result.get("axis", 1) == -1:
        head += ", channels-last (channels on the last axis)"
    if "cpus" in m:
        usable = m.get("usable_cpus")
        head += (f", {m['cpus']} CPUs" + (f" ({usable} usable)" if usable not in (None, m["cpus"])
                                          else "")
                 + f", numba threading layer {m.get('threading_layer', 'not started')}")
    if bw is not None:
        head += (f", memory bandwidth {bw / 1e9:.1f} GB/s (median of "
                 f"{len(result['bandwidth_samples'])} probes taken between the samples; each "
                 "case's roofline uses its own)")
    lines = [head, ""]
    basic = [c for c in result["cases"] if c["operation"] != "relu-step"]
    fused = [c for c in result["cases"] if c["operation"] == "relu-step"]
    if basic:
        names = [e for e in ENGINES if any(e in c["seconds"] for c in basic)]
        lines += _table(basic, names, None)
    if fused:
        names = [e for e in ("nbbn", "nbbn+numpy-relu", "torch")
                 if any(e in c["seconds"] for c in fused)]
        lines += ["", "Fused ReLU, one training step (forward + backward):", ""]
        lines += _table(fused, names, {"nbbn": "nbbn activation='relu'",
                                       "nbbn+numpy-relu": "nbbn + NumPy ReLU",
                                       "torch": "torch relu(bn)"})
    if "pipeline" in result:
        pipe = result["pipeline"]
        names = [e for e in STEPS if any(e in c["seconds"] for c in pipe["cases"])]
        others = [e for e in names if e != "nbbn" and e not in FLOORS]
        over = [(f, e) for f in FLOORS if f in names for e in ("nbbn", "numpy") if e in names]
        lines += ["", "Pipeline: one training step of a NumPy MLP, x (B, 256) @ W1 -> BatchNorm(512) "
                      "-> ReLU -> @ W2 -> BatchNorm(512) -> ReLU and its backward, BLAS matmuls in "
                      f"between ({pipe['threading']}); matmuls: the NumPy step's five matmuls "
                      "alone, and what each NumPy step takes more:", "",
                  "| batch | " + " | ".join(names) + " | "
                  + " | ".join([f"vs {e}" for e in others] + [f"{e} - {f}" for f, e in over])
                  + " |", "|" + "---|" * (1 + len(names) + len(others) + len(over))]
        for c in pipe["cases"]:
            r = c.get("speedup", {})
            lines.append(f"| {c['batch']} | " + " | ".join(_fmt_time(c["seconds"].get(e))
                                                          for e in names)
                         + " | " + " | ".join([_fmt_ratio(r.get(e)) for e in others]
                                              + [_fmt_time(c[f"over_{f}"][e]) for f, e in over])
                         + " |")
    if "startup" in result:
        st = result["startup"]
        lines += ["", f"import nbbn: {st['import_s']:.3f} s; first forward+backward in a new "
                      f"process, warm cache: {st['first_call_warm_s']:.3f} s; with an empty "
                      f"cache (compile): {st['first_call_cold_s']:.1f} s"]
    return "\n".join(lines)


_FIRST_CALL = """
import time
t0 = time.perf_counter()
import numpy as np, nbbn
t1 = time.perf_counter()
x = np.random.default_rng(0).standard_normal((8, 16, 64, 64)).astype(np.float32)
bn = nbbn.BatchNorm(16)
t2 = time.perf_counter()
bn.backward(bn(x))
t3 = time.perf_counter()
print(t1 - t0, t3 - t2)
"""


def first_call_seconds(cache_dir=None, threads=None):
    """``(import nbbn, first training forward + backward)`` in seconds, timed
    inside a fresh interpreter, on an (8, 16, 64, 64) float32 batch (big
    enough for the parallel kernels); ``cache_dir`` sets ``NUMBA_CACHE_DIR``
    (an empty one: a cold compile), ``threads`` ``NUMBA_NUM_THREADS``."""
    env = dict(os.environ)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    if threads is not None:
        env["NUMBA_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", _FIRST_CALL], capture_output=True, text=True,
                         check=True, env=env)
    first, call = (float(v) for v in out.stdout.split())
    return first, call


def startup_times(repeat=3, threads=None):
    """Medians over fresh processes: ``import nbbn``, and the first training
    forward+backward with numba's cache warm; then one with it empty."""
    first_call_seconds(threads=threads)  # warm the cache
    warm = [first_call_seconds(threads=threads) for _ in range(repeat)]
    with tempfile.TemporaryDirectory() as cache:
        cold = first_call_seconds(cache, threads)
    return {"import_s": float(np.median([w[0] for w in warm])),
            "first_call_warm_s": float(np.median([w[1] for w in warm])),
            "first_call_cold_s": cold[1]}


def plot(result, path):
    """A PNG of two bar charts side by side (needs matplotlib): nbbn's speedup
    over each peer per case (above 1: nbbn is faster), and the fraction of the
    memory roofline nbbn reaches."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    cases = [c for c in result["cases"] if "roofline" in c]
    labels = [f"{'x'.join(map(str, c['shape']))}\n{c['operation']}" for c in cases]
    peers = [p for p in ENGINES if any(p in c.get("speedup", {}) for c in cases)]
    x = np.arange(len(cases))
    fig, (ax_speed, ax_roof) = plt.subplots(1, 2, figsize=(max(10, 1.2 * len(cases)), 4.8))
    width = 0.8 / max(1, len(peers))
    for i, peer in enumerate(peers):
        ax_speed.bar(x + (i - (len(peers) - 1) / 2) * width,
                     [c.get("speedup", {}).get(peer, np.nan) for c in cases], width,
                     label=f"vs {peer}")
    ax_speed.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax_speed.set_yscale("log", base=2)
    ax_speed.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax_speed.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_speed.set_ylabel("speedup of nbbn (their time / nbbn's)")
    if peers:
        ax_speed.legend(fontsize=8)
    ax_roof.bar(x, [c["roofline"] for c in cases], color="tab:blue")
    ax_roof.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax_roof.set_ylabel("fraction of the memory roofline")
    for ax in (ax_speed, ax_roof):
        ax.set_xticks(x, labels, rotation=90, fontsize=7)
    fig.suptitle(f"nbbn, {result['machine']['threads']} threads, {result['dtype']}, "
                 f"{result['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scaling(results, path):
    """A PNG of each case's time against the thread count (log-log), one
    line per engine, from the results of a ``--threads`` sweep; the dotted
    line is perfect scaling from nbbn's time at the fewest threads."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    threads = [r["machine"]["threads"] for r in results]
    keys = [(tuple(c["shape"]), c["operation"]) for c in results[0]["cases"]]
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, 4.2 * cols), 3.2 * rows + 0.4),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        cases = [next(c for c in r["cases"] if (tuple(c["shape"]), c["operation"]) == key)
                 for r in results]
        for engine in [e for e in ENGINES if e in cases[0]["seconds"]]:
            ax.plot(threads, [c["seconds"].get(engine, np.nan) * 1e3 for c in cases], "o-",
                    label=engine, linewidth=2 if engine == "nbbn" else 1)
        base = cases[0]["seconds"].get("nbbn")
        if base:
            ax.plot(threads, [base * 1e3 * threads[0] / t for t in threads], ":", color="gray")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(threads, [str(t) for t in threads])
        ax.set_title(f"{'x'.join(map(str, key[0]))} {key[1]}", fontsize=9)
        ax.set_xlabel("threads")
        ax.set_ylabel("ms per call")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    m = results[0]["machine"]
    fig.suptitle(f"nbbn scaling, {results[0]['dtype']}, {m.get('cpus')} CPUs, "
                 f"numba threading layer {m.get('threading_layer', '?')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _threads(text):
    try:
        threads = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected thread counts like 1,2,4,8, got {text!r}")
    if not threads or min(threads) < 1:
        raise argparse.ArgumentTypeError(f"--threads must be >= 1, got {text!r}")
    return threads


def _shape(text):
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 64x64x112x112, got {text!r}")
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"expected a shape of 2 or more positive sizes, got {text!r}")
    return shape


def add_arguments(parser):
    """Add the bench's options to an ``argparse`` parser."""
    parser.add_argument("--threads", type=_threads, metavar="T[,T...]",
                        help="threads for nbbn and torch (default: numba's, "
                             "NUMBA_NUM_THREADS); several, like 1,2,4,8, sweep them: a table "
                             "for each, and a scaling chart with --plot")
    parser.add_argument("--shapes", type=_shape, nargs="+", metavar="SHAPE",
                        help="(N, C, ...) shapes like 64x64x112x112 (default: the issue's set)")
    parser.add_argument("--ops", nargs="+", choices=OPERATIONS, metavar="OP",
                        help=f"operations, of {', '.join(OPERATIONS)} (default: the first "
                             "three, and relu-step on the largest default shape)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="inputs' dtype; float16 and bfloat16 (extra 'bfloat16') run with "
                             "float32 parameters, as torch's mixed precision, and the roofline "
                             "counts their 2-byte traffic")
    parser.add_argument("--axis", type=int, choices=(1, -1), default=1,
                        help="the channels' axis of the shapes: 1, (N, C, ...); -1, "
                             "channels-last (N, ..., C), torch's channels_last tensors")
    parser.add_argument("--engines", nargs="+", choices=tuple(ENGINES), default=DEFAULT_ENGINES,
                        metavar="ENGINE",
                        help=f"of {', '.join(ENGINES)} (default: all but torch-out, torch "
                             "writing into preallocated outputs)")
    parser.add_argument("--repeat", type=int, default=7, help="samples per figure (7)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: nbbn's GPU kernels against torch's cuDNN and the copy "
                             "bandwidth, on the GPU's default cases unless --shapes")
    parser.add_argument("--pipeline", type=int, nargs="*", metavar="B",
                        help="time a NumPy MLP training step at these batch sizes (default: "
                             f"{' '.join(map(str, BATCHES))}; in the default run too)")
    parser.add_argument("--startup", action="store_true",
                        help="also time import, first call, and a cold compile (~30 s)")
    parser.add_argument("--json", metavar="PATH", help="write every figure here as JSON")
    parser.add_argument("--plot", metavar="PATH",
                        help="write PNG bar charts of the speedups and roofline fractions "
                             "(extra 'plot')")
    return parser


def main(args):
    """Run the bench from parsed ``args``; print the table; return 0."""
    import numba
    if args.repeat < 1:
        raise SystemExit(f"bench: --repeat must be >= 1, got {args.repeat}")
    most = numba.config.NUMBA_NUM_THREADS
    if args.threads is not None and max(args.threads) > most:
        raise SystemExit(f"bench: --threads must be in 1..{most} (NUMBA_NUM_THREADS; set it "
                         f"higher to run more threads), got {max(args.threads)}")
    if args.plot:
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:
            raise SystemExit("bench: --plot needs matplotlib: pip install 'nbbn[plot]'")
    if args.device == "cuda" and args.axis != 1:
        raise SystemExit("bench: --device cuda has channels-last cases of its own; --axis -1 is "
                         "for the CPU bench")
    if args.device == "cuda" and args.dtype not in ("float32", "float64"):
        raise SystemExit(f"bench: --device cuda takes float32 or float64, got {args.dtype}")
    dtype_named(args.dtype)  # bfloat16 without ml_dtypes: say so before anything runs
    if args.device == "cuda":
        from . import cuda_bench
        results = cuda_bench.main(args.shapes, args.dtype, args.repeat)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({str(k): v for k, v in results.items()}, f, indent=1)
        return 0
    if args.shapes is None and args.ops is None:
        cases = DEFAULT_CASES if args.pipeline is None else ()
    else:
        cases = tuple((s, op) for s in (args.shapes or DEFAULT_SHAPES)
                      for op in (args.ops or BASIC_OPS))
    if args.axis == -1 and args.shapes is None:  # the default shapes, channels last
        cases = tuple((s[:1] + s[2:] + s[1:2], op) for s, op in cases)
    batches = ((args.pipeline or BATCHES) if args.pipeline is not None
               else BATCHES if cases is DEFAULT_CASES else ())
    if any(b < 2 for b in batches):
        raise SystemExit(f"bench: --pipeline batch sizes must be >= 2, got {batches}")

    def progress(text):
        print(f"  ... {text}", file=sys.stderr, flush=True)

    results = []
    for threads in args.threads or (None,):
        if threads and len(args.threads) > 1:
            progress(f"{threads} threads")
        result = run(cases, args.dtype, tuple(args.engines), threads, args.repeat,
                     progress=progress, axis=args.axis)
        if batches:
            result["pipeline"] = run_pipeline(batches, threads=result["machine"]["threads"],
                                              repeat=args.repeat, progress=progress)
        if args.startup:
            progress("import time, first call, cold compile (fresh processes)")
            result["startup"] = startup_times(threads=result["machine"]["threads"])
        print(format_table(result) + ("\n" if args.threads and len(args.threads) > 1 else ""),
              flush=True)
        results.append(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results[0] if len(results) == 1 else {"sweep": results}, f, indent=1)
    if args.plot:
        if len(results) == 1:
            plot(results[0], args.plot)
        else:  # the scaling chart, and each thread count's bars beside it
            plot_scaling(results, args.plot)
            stem, ext = os.path.splitext(args.plot)
            for r in results:
                plot(r, f"{stem}-{r['machine']['threads']}threads{ext or '.png'}")
    return 0
