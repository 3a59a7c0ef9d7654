"""Running ``hat`` commands as a torchrun group of two CPU processes, for tests and the stress
benchmark (benchmarks/torchrun_stress.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.torchrun_probe import REPORT

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("torchrun_probe.py")


def torchrun(*args, script: Path = PROBE, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 script *args`` (by default ``hat`` through the
    exit probe); --standalone picks a free port, so runs side by side never collide."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(script), *map(str, args)]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}  # a script imports hat too
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def threads_at_exit(run: subprocess.CompletedProcess) -> dict[int, int]:
    """Rank → gloo threads still running when that rank's interpreter began to exit."""
    found = re.findall(rf"rank (\d+): {REPORT}: (\d+)", run.stdout)
    return {int(rank): int(count) for rank, count in found}


def ended_cleanly(run: subprocess.CompletedProcess) -> bool:
    """Exit 0, both ranks reported, with every gloo thread joined before interpreter exit."""
    return run.returncode == 0 and threads_at_exit(run) == {0: 0, 1: 0}
