"""What the first call of each op costs in a fresh process, after ``import rnl_fast``.

    python bench/first_call.py [--runs 5]

Each run starts a new Python process that imports torch and rnl_fast, then calls each op twice
on a small CPU tensor (the C++ backend) and reports the seconds of both calls, and whether the
compiler stack (``torch._dynamo``) was imported on the way. The target (issue 12): every first
call ≤ 0.2 s. ``pytest bench/ -k first_call --benchmark-only`` runs the same measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

#: The child process: import, then each op twice; prints one JSON object.
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import rnl_fast
t2 = time.perf_counter()
x = torch.rand(8, 4, 64)

def if_fwd():
    rnl_fast.if_sequence(x)

def if_fwd_bwd():
    xg = x.clone().requires_grad_()
    rnl_fast.if_sequence(xg).spikes.sum().backward()

def pool():
    with torch.no_grad():
        rnl_fast.if_sequence_pool2x2(torch.rand(8, 2, 3, 6, 6))

layer = rnl_fast.RateNorm()
def rate_norm_fwd_bwd():
    layer(x.clone().requires_grad_()).sum().backward()

qcfs = rnl_fast.QCFS()
def qcfs_fwd_bwd():
    qcfs(x.clone().requires_grad_()).sum().backward()

out = {"import torch": t1 - t0, "import rnl_fast": t2 - t1}
for name, op in [("if fwd", if_fwd), ("if fwd+bwd", if_fwd_bwd), ("if+pool fwd", pool),
                 ("rate norm fwd+bwd", rate_norm_fwd_bwd), ("qcfs fwd+bwd", qcfs_fwd_bwd)]:
    s = time.perf_counter(); op(); first = time.perf_counter() - s
    s = time.perf_counter(); op(); second = time.perf_counter() - s
    out[name] = [first, second]
out["torch._dynamo imported"] = "torch._dynamo" in sys.modules
print(json.dumps(out))
"""

#: Every first call at most this many seconds (issue 12).
TARGET_S = 0.2


def measure_once() -> dict:
    """One fresh process: the seconds of its imports and of each op's first and second call."""
    # From a temporary folder: `python -c` puts the working directory first on sys.path, and a
    # source tree there may lack the built extension that the installed package has.
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=folder)
    if done.returncode != 0:
        raise RuntimeError(f"the child process failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(runs: list[dict]) -> str:
    """Medians over the runs, one line per op, with the target's verdict."""
    lines = [f"first call after `import rnl_fast`, fresh process, CPU, median of {len(runs)} runs"]
    for key in ("import torch", "import rnl_fast"):
        lines.append(f"  {key:<20} {statistics.median(r[key] for r in runs):8.3f} s")
    for key, value in runs[0].items():
        if isinstance(value, list):
            first = statistics.median(r[key][0] for r in runs)
            second = statistics.median(r[key][1] for r in runs)
            verdict = "ok" if first <= TARGET_S else "MISS"
            lines.append(
                f"  {key:<20} {first:8.3f} s first, {second * 1e3:7.2f} ms second  (≤ {TARGET_S} s: {verdict})"
            )
    imported = sum(r["torch._dynamo imported"] for r in runs)
    lines.append(f"  torch._dynamo imported in {imported} of {len(runs)} runs")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes (default: 5)")
    args = parser.parse_args()
    print(table([measure_once() for _ in range(args.runs)]))


if __name__ == "__main__":
    main()
