"""NumPy's BLAS on one thread.

NumPy's matrix products (the tracker's window resizes, the 3D poses' point clouds) run on OpenBLAS, whose pool
has a thread per core that keeps spinning for a while after each call. On a machine with as many cores as torch has
threads, that spinning takes a core from torch: on 2 cores, an instruction (`pipeline.run`, torch on 2 threads) run
right after five of the tracker's window resizes took 63-68 ms instead of 41-44 ms after a pause; with OpenBLAS on
one thread, 41-45 ms either way. These products are small (a few hundred rows), so one thread costs them nothing.
`threadpoolctl` sets it at run time, whatever BLAS NumPy was built with and whenever it was imported.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def single_threaded_numpy_blas() -> bool:
    """Limit the process's BLAS pools (OpenBLAS, MKL, BLIS) to one thread; torch's own pool is not touched.
    False (with a warning) when threadpoolctl is not installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        log.warning("threadpoolctl is not installed: NumPy's BLAS keeps its thread per core (pip install -r "
                    "requirements.txt)")
        return False
    threadpool_limits(limits=1, user_api="blas")
    return True
