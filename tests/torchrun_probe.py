"""``python -m hat ...`` as torchrun runs it, reporting at interpreter exit how many of gloo's
threads still run: a finished rank must have joined them already (see hat/distributed.py).

    torchrun --nproc_per_node 2 tests/torchrun_probe.py train --model hat-tiny ...
"""

import atexit
import os
import runpy
import sys

GLOO_THREAD_NAMES = ("pt_gloo", "gloo_")  # gloo's worker and transport threads (Linux names)
REPORT = "gloo threads at exit"


def thread_names() -> list[str]:
    """The names of this process's threads. Other threads (torch's pools, the store's) may end
    while they are listed: one gone before its name is read is simply not running."""
    tasks = f"/proc/{os.getpid()}/task"
    names = []
    for task in os.listdir(tasks):
        try:
            with open(f"{tasks}/{task}/comm") as fh:
                names.append(fh.read().strip())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return names


def gloo_threads() -> int:
    return sum(name.startswith(GLOO_THREAD_NAMES) for name in thread_names())


def report() -> None:
    print(f"rank {os.environ.get('RANK', '0')}: {REPORT}: {gloo_threads()}", flush=True)


if __name__ == "__main__":
    atexit.register(report)
    sys.argv = ["hat", *sys.argv[1:]]
    runpy.run_module("hat", run_name="__main__", alter_sys=True)
