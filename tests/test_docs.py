"""The Python examples of README.md and docs/adapters.md run as written, and the results their
comments state are what they give (a renamed argument or a changed output would otherwise go
unnoticed until a newcomer tries them)."""
import contextlib
import io
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def run_examples(doc: str) -> tuple[dict, list[str]]:
    """Run every ```python block of ``doc`` in order in one namespace (later blocks use earlier
    ones' names, as a reader does); returns the namespace and each block's printed output."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.S)
    assert blocks, f"no python examples in {doc}"
    namespace, printed = {}, []
    for i, block in enumerate(blocks, 1):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"{doc}, example {i}", "exec"), namespace)
        printed.append(out.getvalue())
    return namespace, printed


def test_readme_examples():
    ns, printed = run_examples("README.md")
    # "Convert a torchvision model"
    assert ns["out"].shape == (1, 19, 256, 512)
    fractions = ns["seg"].last_plan.level_fractions()
    assert fractions.shape == (1, 2) and abs(float(fractions.sum()) - 1) < 1e-12
    assert ns["logits"].shape == (2, 1000)
    # "Masks and multiply-adds": "~0.65 of stride 8"
    assert abs(float(printed[1]) - 0.65) < 0.01, printed[1]
    # "The core API"
    y = ns["y"]
    assert y.step == 1 and y.dense().shape == (2, 128, 45, 61)
    assert y.dense(grid="step").shape == (2, 128, 23, 31)
    assert y.indices.dtype == torch.int32 and list(y.spatial_shape) == [45, 61]


def test_adapters_doc_example():
    ns, _ = run_examples("docs/adapters.md")
    assert ns["out"]["out"].shape == (1, 19, 512, 1024)
    assert ns["logits"].shape == (2, 1000)
