"""The threading layer under nbbn's parallel kernels.

numba picks a threading layer when the first parallel function of the process
runs, and keeps it: TBB if it can load it, else OpenMP, else its own
``workqueue`` (``NUMBA_THREADING_LAYER`` chooses instead). With the pip wheels
on Linux, numba finds no TBB and takes GNU OpenMP, whose threads spin for a
while after every parallel region: in a training loop NumPy's BLAS threads
then run each matmul on cores held by spinning threads, and the step gets
several times slower. GNU OpenMP also aborts any child started by ``fork()``
once the parent has used it. TBB's threads sleep when idle and survive fork.

nbbn depends on the ``tbb`` wheel where PyPI has one (x86-64 Linux, Windows,
macOS); the wheel puts the TBB library in ``<prefix>/lib`` (``Library/bin``
on Windows), off the loader's path, where numba does not look. So
``import nbbn`` loads it first (:func:`load_tbb`), and numba's default choice
then finds TBB. A layer the user chose is honoured; where numba ends up on
GNU OpenMP anyway, nbbn says why once (a RuntimeWarning) and runs its serial
kernels in forked children, which keeps fork-started pools working.
"""
import os
import sys
import sysconfig
import threading
import warnings

#: The TBB library numba's ``tbb`` layer links to, and the folder of an
#: install prefix where the ``tbb`` wheel puts it.
_LIBTBB = {"linux": ("lib", "libtbb.so.12"), "darwin": ("lib", "libtbb.12.dylib"),
           "win32": (os.path.join("Library", "bin"), "tbb12.dll")}

#: Why TBB is not loaded (None once it is, or where nbbn did not need to).
tbb_problem = "not looked for yet"
#: Serializes parallel kernel calls while the layer is unknown, and for good
#: under ``workqueue``, which aborts when two threads enter it; None otherwise.
lock = threading.Lock()
#: False in a child forked from a process that ran GNU OpenMP threads: there
#: the parallel kernels would abort it, so nbbn runs their serial twins.
parallel_ok = True
_layer = None


def _prefixes():
    import site
    paths = [sysconfig.get_paths()["data"], sys.prefix, sys.exec_prefix,
             getattr(site, "USER_BASE", None)]
    return list(dict.fromkeys(p for p in paths if p))


def load_tbb():
    """Load the ``tbb`` wheel's library (``RTLD_GLOBAL``) so that numba finds
    it, unless numba has already started a layer; return its path or None
    (:data:`tbb_problem` then says why)."""
    global tbb_problem
    started = sys.modules.get("numba.np.ufunc.parallel")
    if started is not None and started._is_initialized:
        tbb_problem = "numba had started its threading layer before nbbn was imported"
        return None
    folder, name = _LIBTBB.get(sys.platform if sys.platform != "cygwin" else "linux",
                               _LIBTBB["linux"])
    import ctypes
    errors = []
    for prefix in _prefixes():
        path = os.path.join(prefix, folder, name)
        if not os.path.exists(path):
            continue
        try:
            ctypes.CDLL(path, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
        except OSError as e:
            errors.append(f"{path}: {e}")
            continue
        tbb_problem = None
        return path
    tbb_problem = ("; ".join(errors) if errors else
                   f"the tbb package is not installed ({name} is in no install prefix)")
    return None


def layer():
    """The threading layer of the process, or None before nbbn's first parallel call."""
    return _layer


def started():
    """Note the layer numba chose, after nbbn's first parallel kernel returned:
    drop the lock unless the layer is ``workqueue``; under GNU OpenMP, warn
    (unless the user chose it) and run serial kernels in forked children."""
    global lock, _layer
    import numba
    _layer = numba.threading_layer()
    if _layer != "workqueue":
        lock = None
    if _layer != "omp":
        return
    from numba.np.ufunc import omppool
    if getattr(omppool, "openmp_vendor", "GNU") != "GNU":
        return
    os.register_at_fork(after_in_child=_forked)
    if str(numba.config.THREADING_LAYER).lower() == "default":
        reason = tbb_problem or "numba could not use it"
        warnings.warn(
            "nbbn runs on numba's GNU OpenMP threading layer, not TBB "
            f"({reason}). Its threads spin between calls and slow down NumPy's "
            "multithreaded BLAS called in between, and fork()-started children run "
            "nbbn single-threaded. To use TBB: pip install tbb (x86-64) and import nbbn "
            "before other parallel numba code; set NUMBA_THREADING_LAYER to choose a "
            "layer yourself (this warning is then not shown).", RuntimeWarning, stacklevel=4)


def thread_count_functions():
    """``(get, put)``: numba's thread count of the calling thread, read and
    set. Once numba's threading layer is launched (this launches it), the
    layer's own functions that ``numba.get_num_threads`` and
    ``numba.set_num_threads`` call: those wrappers take a process-wide lock
    on every call, 0.7 and 1.05 us against 0.1 (measured), and a call on a
    team smaller than the caller's threads makes three such calls. The
    public functions where this numba lacks them."""
    import numba
    from numba.np.ufunc import parallel
    numba.get_num_threads()
    get = getattr(parallel, "_get_num_threads", None)
    put = getattr(parallel, "_set_num_threads", None)
    if not (callable(get) and callable(put) and get() == numba.get_num_threads()):
        return numba.get_num_threads, numba.set_num_threads
    return get, put


def _forked():
    global parallel_ok
    parallel_ok = False
