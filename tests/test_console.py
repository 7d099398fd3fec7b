"""What a search prints: the Ray workers' own output reaches the console only when asked for
(``raycxr -v``). A real local Ray in a subprocess (its own, beside the tests' one)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

_SCRIPT = """
import sys, time
import ray
from raycxr.cluster import init_ray

init_ray(address=None, num_cpus=1, worker_logs=sys.argv[1] == "on")

@ray.remote
def shout():
    print("HELLO-FROM-A-RAY-WORKER", flush=True)
    return 1

assert ray.get(shout.remote()) == 1
time.sleep(3)  # the log monitor forwards worker output about once a second
ray.shutdown()
"""


@pytest.mark.parametrize("worker_logs, shown", [("off", False), ("on", True)])
def test_worker_output_reaches_the_console_only_with_worker_logs(worker_logs, shown):
    out = subprocess.run([sys.executable, "-c", _SCRIPT, worker_logs], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("HELLO-FROM-A-RAY-WORKER" in out.stdout + out.stderr) is shown
