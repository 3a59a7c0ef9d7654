"""How often a two-process torchrun of ``hat train`` and of ``hat index build`` ends cleanly.

A run passes when torchrun exits 0 and both ranks had joined every gloo thread before their
interpreter began to exit (tests/torchrun_probe.py); anything else is a failure, its output kept.
``--hog N`` keeps N busy-looping processes beside the runs, since the exit race this guards
against (hat/distributed.py) shows up when the ranks are starved of CPU.

    python benchmarks/torchrun_stress.py --runs 50 [--hog 2] [--only train]
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch
from common import write_report

from hat import create_model
from hat.data.synthetic import write_synthetic_dataset
from tests.multiprocess import ended_cleanly, threads_at_exit, torchrun


def busy_loop() -> None:
    while True:
        pass


def commands(work: Path) -> dict[str, list[str]]:
    """The two torchrun entry points on a small synthetic set and a tiny checkpoint."""
    dataset = write_synthetic_dataset(work / "data", {"train": 48, "val": 8, "test": 16}, seed=0)
    images = work / "data" / "images"
    torch.manual_seed(0)
    model, tokenizer = create_model("hat-tiny")
    checkpoint = model.eval().save_pretrained(work / "checkpoint", tokenizer)
    train = ["train", "--model", "hat-tiny", "--data", dataset, "--image-root", images]
    train += ["--out", work / "run", "--epochs", "2", "--batch-size", "8", "--workers", "0"]
    train += ["--freeze-epochs", "1", "--max-steps-per-epoch", "3", "--val-split", ""]
    index = ["index", "build", "--checkpoint", checkpoint, "--karpathy", dataset]
    index += ["--image-root", images, "--split", "test", "--cache", work / "cache"]
    index += ["--device", "cpu", "--workers", "0", "--quiet"]
    return {"train": list(map(str, train)), "index build": list(map(str, index))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=50, help="runs of each command")
    parser.add_argument("--hog", type=int, default=0, help="busy processes beside the runs")
    parser.add_argument("--only", choices=["train", "index build"], help="one command only")
    parser.add_argument("--out", help="JSON report (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    hogs = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(args.hog)]
    for hog in hogs:
        hog.start()
    report: dict = {"runs": args.runs, "hog_processes": args.hog, "commands": {}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, command in commands(Path(tmp)).items():
                if args.only and name != args.only:
                    continue
                passed, failures, seconds = 0, [], []
                for run_index in range(args.runs):
                    start = time.perf_counter()
                    run = torchrun(*command, timeout=600)
                    seconds.append(time.perf_counter() - start)
                    if ended_cleanly(run):
                        passed += 1
                    else:
                        tail = (run.stderr + run.stdout)[-1500:]
                        failures.append({"run": run_index, "rc": run.returncode, "tail": tail})
                        print(
                            f"{name}: run {run_index} failed (rc {run.returncode}, "
                            f"threads at exit {threads_at_exit(run)})"
                        )
                print(
                    f"{name}: {passed} / {args.runs} ended cleanly (hog {args.hog}, "
                    f"median {sorted(seconds)[len(seconds) // 2]:.1f} s a run)"
                )
                report["commands"][name] = {
                    "passed": passed,
                    "median_s": round(sorted(seconds)[len(seconds) // 2], 1),
                    "failures": failures,
                }
    finally:
        for hog in hogs:
            hog.terminate()
    suffix = f"_hog{args.hog}" if args.hog else ""
    write_report(f"torchrun_stress{suffix}", report, args.out)
    return report


if __name__ == "__main__":
    main()
