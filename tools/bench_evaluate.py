"""Where the evaluate stage's time goes: seconds per phase, median and minimum over repeats.

Stage mode (a run directory whose sample stage is complete)::

    python tools/bench_evaluate.py --repeats 2 -- experiment.runs_dir=/tmp/es [key=value ...]

runs ``python -m pipeline.cli evaluate <overrides>`` ``--repeats`` times, each against a fresh
copy of the weights cache (``$LATENTPIPE_CACHE`` or ``~/.cache/latentpipe``) without its
``fid-reference/`` and ``classifier/`` entries, i.e. as a first run on new data pays (``--warm``
keeps them: what a second experiment on the same data pays). Phase times are read off the
stage's own log lines (``<phase>: done in h:mm:ss``, pipeline.runtime.progress.Countdown), so
they are whole seconds; "stage" is the command's wall time. ``--pythonpath DIR`` runs the code of
another checkout (e.g. the main branch) for a before/after comparison on the same run.

Inception mode::

    python tools/bench_evaluate.py --inception 20 --repeats 3

times the Inception features of 20 random 28 x 28 gray images (the default data's size) through
the TorchScript export and through the folded network (pipeline.metrics.inception), ms per
image, and prints the largest feature difference between the two.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DONE = re.compile(r"INFO \S+: (evaluate: .+?): done in (\d+):(\d\d):(\d\d)")


def phases(log: str) -> dict[str, float]:
    """{phase: seconds} from the stage's "done in" lines (phase names shortened)."""
    found = {}
    for match in DONE.finditer(log):
        name = re.sub(r"\s*\(.*$", "", match.group(1).removeprefix("evaluate: "))
        found[name] = 3600 * int(match.group(2)) + 60 * int(match.group(3)) + int(match.group(4))
    return found


def stage_once(overrides: list[str], warm: bool, pythonpath: str | None) -> dict[str, float]:
    source = Path(os.environ.get("LATENTPIPE_CACHE", Path.home() / ".cache" / "latentpipe"))
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        cache = Path(tmp) / "cache"
        shutil.copytree(source, cache, ignore=None if warm else shutil.ignore_patterns("fid-reference", "classifier"))
        env = {**os.environ, "LATENTPIPE_CACHE": str(cache), "LATENTPIPE_PROGRESS_SECONDS": "3600"}
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "evaluate", *overrides],
            env=env,
            cwd=pythonpath or None,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"evaluate failed ({done.returncode}):\n{done.stderr[-3000:]}")
    log = done.stdout + done.stderr
    print(next((line for line in log.splitlines() if "evaluate: fid=" in line), ""), flush=True)
    return {**phases(log), "stage": wall}


def inception_once(count: int, folded: bool) -> tuple[float, object]:
    import torch

    from pipeline.metrics.features import InceptionFeatures

    net = InceptionFeatures(folded=folded)
    images = torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    net(images[:2])  # warm-up (TorchScript profiles its first calls)
    start = time.perf_counter()
    features = net(images)
    return 1000 * (time.perf_counter() - start) / count, features


def report(runs: list[dict[str, float]], unit: str) -> None:
    for name in runs[0]:
        values = [run[name] for run in runs if name in run]
        print(f"{name:>60}: median {statistics.median(values):8.1f} {unit}, min {min(values):8.1f} {unit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warm", action="store_true", help="keep the cached references and classifier")
    parser.add_argument("--pythonpath", help="run the evaluate stage of another checkout")
    parser.add_argument("--inception", type=int, metavar="N", help="time the Inception paths on N images instead")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for the evaluate stage")
    args = parser.parse_args()
    if args.inception:
        runs, reference = [], None
        for _ in range(args.repeats):
            run = {}
            for folded in (False, True):
                run["folded" if folded else "torchscript export"], features = inception_once(args.inception, folded)
                if folded:
                    print(f"max |folded - export| of the features: {float((features - reference).abs().max()):.2e}")
                reference = features
            runs.append(run)
        report(runs, "ms/image")
    else:
        report([stage_once(args.overrides, args.warm, args.pythonpath) for _ in range(args.repeats)], "s")


if __name__ == "__main__":
    main()
