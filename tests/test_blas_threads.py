"""NumPy's BLAS on one thread (grounding/blas_threads.py), torch's threads untouched; run in a fresh interpreter,
since the limit is process-wide."""
import json
import os
import subprocess
import sys

SCRIPT = """
import json, numpy, torch, threadpoolctl
torch.set_num_threads(2)
from flmm_ros.grounding.blas_threads import single_threaded_numpy_blas
def pools():
    return {i["internal_api"]: i["num_threads"] for i in threadpoolctl.threadpool_info()}
before = pools()
ok = single_threaded_numpy_blas()
print(json.dumps({"before": before, "after": pools(), "ok": ok, "torch": torch.get_num_threads()}))
"""


def test_numpy_blas_gets_one_thread_and_torch_keeps_its_own():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True,
                         env=env)
    pools = json.loads(out.stdout.strip().splitlines()[-1])
    assert pools["ok"] and pools["torch"] == 2
    blas = [api for api in pools["before"] if api in ("openblas", "mkl", "blis", "flexiblas")]
    assert blas, f"no BLAS pool found: {pools['before']}"
    assert all(pools["after"][api] == 1 for api in blas)
    assert pools["after"].get("openmp") == pools["before"].get("openmp")
