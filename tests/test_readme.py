"""Every ```python block of README.md runs (issue 13: the layer example ended in a NameError).

The blocks run in order in one namespace, as a reader pasting them into one session would: a
block may use the names the blocks before it defined. A block that needs an optional package
(SpikingJelly, NIR, ONNX) is skipped without it, and runs in a copy of the namespace so that what
it defines does not reach the blocks after it. Only two things differ from a reader's session:

- the datasets are small random subsets (256 training and 64 test images), so that the README's
  training and simulation run in seconds; the code runs as written, epochs and T included;
- the blocks after the end-to-end example may use ``x`` (a batch of test images), ``T`` (steps),
  ``ann`` (the ReLU network) and ``loader`` (training batches), which the README names in its
  comments ("x: a batch", "ann: ...") rather than defining each time.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from rnl_fast import data

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)
OPTIONAL = ("spikingjelly", "nir", "onnx")
SMALL = {"train": 256, "test": 64}
#: The blocks from here on (after the end-to-end example and its variants) get the prelude.
FIRST_WITH_PRELUDE = 4


def _needs(block: str) -> str | None:
    """The optional package a block imports, if any."""
    return next((name for name in OPTIONAL if re.search(rf"^\s*(from|import) {name}\b", block, re.M)), None)


def _prelude(namespace: dict) -> dict:
    """The names the later blocks use without defining them, from what the earlier blocks made."""
    extra = {}
    if "test_loader" in namespace:
        extra["x"] = next(iter(namespace["test_loader"]))[0][:8]
        extra["T"] = 8
    if "relu_net" in namespace:
        extra["ann"] = namespace["relu_net"]
    if "train_loader" in namespace:
        extra["loader"] = namespace["train_loader"]
    return extra


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """The shared namespace, the blocks already run into it, and a small-dataset session."""
    real = data.load_dataset

    def small(name, split, root=None):
        return data.subset(real(name, split, root), SMALL[split], seed=0)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "load_dataset", small)
        mp.chdir(tmp_path_factory.mktemp("readme"))  # the blocks write files (cnn7.nir, snn.pt2)
        yield {"namespace": {"__name__": "readme"}, "ran": 0}


def _run(index: int, story: dict) -> None:
    """Run the blocks before ``index`` (the shared ones) if not yet run, then block ``index``."""
    namespace = story["namespace"]
    while story["ran"] <= index:
        i = story["ran"]
        story["ran"] += 1
        block, package = BLOCKS[i], _needs(BLOCKS[i])
        if package is not None and i != index:
            continue  # an optional block defines nothing for the blocks after it
        if package is not None and importlib.util.find_spec(package) is None:
            pytest.skip(f"README block {i + 1} needs {package}")
        code = compile(block, f"README.md python block {i + 1}", "exec")
        if i >= FIRST_WITH_PRELUDE:
            namespace.update(_prelude(namespace))
        exec(code, namespace if package is None else dict(namespace))


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_readme_block_runs(index, story):
    if story["ran"] > index:  # already run as a block an earlier-selected test needed
        return
    _run(index, story)
