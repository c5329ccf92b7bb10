"""notebooks/lab6.ipynb runs top to bottom, and shows what it says."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "lab6.ipynb"


@pytest.mark.slow
def test_lab6_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = "\n".join(
        output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )  # fmt: skip
    assert "IProgress" not in outputs and "TqdmWarning" not in outputs  # no widget bar without ipywidgets
    assert "0.7198" in outputs  # lab 001's first loss, with backprop=manual
    assert "def backward" in outputs
    assert "trial 6/6" in outputs or "done: 6/6" in outputs
    assert "result: test/loss=" in outputs and "by the refit of trial #" in outputs  # the test split, once
    assert "{'train': 300, 'val': 100, 'test': 100}" in outputs  # the validation split's rows
    code_outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert sum(output.get("output_type") == "display_data" for output in code_outputs) >= 3  # the figures
