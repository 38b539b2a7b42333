"""bench/gpu.sh, the script a GPU machine runs unattended: it must parse and say how to run it, here on the CPU.
(Its CPU half runs with `bash bench/gpu.sh --smoke`; the figures of every bench are in the docs.)"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_gpu_script_parses_and_documents_its_options():
    assert sh("bash", "-n", "bench/gpu.sh").returncode == 0
    usage = sh("bash", "bench/gpu.sh", "--help")
    assert usage.returncode == 0
    for option in ("--cpu-only", "--smoke", "--payload", "--deadline", "ratio: X"):
        assert option in usage.stdout
    wrong = sh("bash", "bench/gpu.sh", "--no-such-option")
    assert wrong.returncode == 2 and "unknown argument: --no-such-option" in wrong.stderr


def test_gpu_bench_phases_are_the_ones_the_script_runs():
    usage = sh(sys.executable, "bench/gpu_bench.py", "--help")
    assert usage.returncode == 0
    script = (ROOT / "bench" / "gpu.sh").read_text()
    run = set(re.findall(r"^\s*phase (?:cpu|gpu) \S+ (\w+)", script, re.M))
    assert run == {"check", "prepare", "rate", "embed", "backfill", "http"}
    assert all(p in usage.stdout for p in run)
