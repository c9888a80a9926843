"""The eager path stays light: calling every op (forward and backward) in a fresh process never
imports the compiler stack. torch.library.custom_op wraps implementations in
torch._disable_dynamo, which imports torch._dynamo on the first call (1.1-2 s before the first IF
step); rnl_fast.ops._library registers the ops without it. Timing is bench/first_call.py's job."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import sys, torch, rnl_fast
x = torch.rand(6, 2, 3, 4, 4, requires_grad=True)
rnl_fast.if_sequence(x).spikes.sum().backward()
rnl_fast.IFSequence()(x).sum().backward()
with torch.no_grad():
    rnl_fast.if_sequence_pool2x2(x)
rnl_fast.RateNorm()(x).sum().backward()
rnl_fast.RateNorm(channel_wise=True, levels=4)(x[0]).sum().backward()
rnl_fast.QCFS()(x).sum().backward()
print("torch._dynamo" in sys.modules)
"""


def test_calling_every_op_does_not_import_the_compiler(tmp_path):
    # From an empty folder: `python -c` puts the working directory first on sys.path, and the
    # source tree there (CI runs from the repository root) has no built extension.
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"
