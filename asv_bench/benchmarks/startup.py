"""What a new process pays: ``import nbbn``, the first training forward and
backward with numba's cache warm, and the same with it empty (a cold
compile of what that call needs). Each runs in a fresh interpreter."""
import tempfile

from . import THREADS


class Startup:
    timeout = 900
    number = 1
    repeat = 1
    unit = "seconds"

    def track_import(self):
        from nbbn.programs.bench import first_call_seconds
        return first_call_seconds(threads=THREADS)[0]

    def track_first_call_warm_cache(self):
        from nbbn.programs.bench import first_call_seconds
        first_call_seconds(threads=THREADS)  # fills the cache if it is not yet
        return first_call_seconds(threads=THREADS)[1]

    def track_first_call_cold_compile(self):
        from nbbn.programs.bench import first_call_seconds
        with tempfile.TemporaryDirectory() as cache:
            return first_call_seconds(cache_dir=cache, threads=THREADS)[1]
