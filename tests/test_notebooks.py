"""The walkthroughs run top to bottom, headless, on the embedded model."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_paper_objectives.ipynb"])
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("D3PO_SESSION", str(tmp_path / "session"))
    monkeypatch.setenv("D3PO_ROUNDS", "2")
    monkeypatch.setenv("D3PO_GRIDS", "4")
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = "".join(
        out.get("text", "")
        for cell in book.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    if name.startswith("01"):
        assert "Round 1 saved" in outputs and "Left was" in outputs
    else:
        assert "jpeg_compressibility" in outputs and "jpeg_incompressibility" in outputs
        assert "jpeg_compressibility D3PO" in outputs and "jpeg_compressibility DDPO" in outputs
