"""The notebooks run top to bottom on small inputs, so they never rot."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

# each notebook runs in a kernel of its own (half a minute each): in the slow suite, which CI runs too
pytestmark = pytest.mark.slow


def run_notebook(name: str) -> str:
    """Execute notebooks/<name> (in memory) and return all of its text output."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            texts.append(out.get("text", "") or data.get("text/markdown", "") or data.get("text/plain", ""))
    return "\n".join(texts)


@pytest.fixture(autouse=True)
def small_inputs(real_corpus):
    os.environ["SHAKEGPT_DATA"] = str(real_corpus)
    os.environ["SHAKEGPT_NB_STEPS"] = "20"  # the model notebook trains its own small model this long
    os.environ.pop("SHAKEGPT_CKPT", None)


def test_data_notebook():
    out = run_notebook("01_data.ipynb")
    assert "1,115,394 characters, 65 distinct" in out
    assert "train: 1,003,854 characters, val: 111,540 characters" in out
    assert "sha256 matches): True" in out


def test_model_notebook():
    out = run_notebook("02_model.ipynb")
    assert "quickstart      410,752" in out  # exact parameter count next to the original runs' formula
    assert "trained 20 steps" in out


def test_results_notebook():
    out = run_notebook("03_results.ipynb")
    assert "reference runs in" in out and "| run | params |" in out  # the table as markdown: rendered
