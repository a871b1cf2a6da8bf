"""tools/bench_evaluate.py reads the evaluate stage's phase times off its own log lines."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_evaluate", ROOT / "tools" / "bench_evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_phase_times_from_the_stage_log():
    log = (
        "16:01:02 INFO pipeline.runtime.progress: evaluate: Inception features of the samples: 1000 images ...\n"
        "16:02:05 INFO pipeline.runtime.progress: evaluate: Inception features of the samples: done in 0:01:03\n"
        "16:02:06 INFO pipeline.runtime.progress: evaluate: Inception features of 473 real val images: done in "
        "0:00:41 (cached for later runs)\n"
        "16:09:00 INFO pipeline.runtime.progress: evaluate: likelihood of 16 val latents (PF-ODE from sigma_min to "
        "sigma_max): done in 1:02:03 (212 network evaluations)\n"
    )
    assert load_tool().phases(log) == {
        "Inception features of the samples": 63,
        "Inception features of 473 real val images": 41,
        "likelihood of 16 val latents": 3723,
    }
