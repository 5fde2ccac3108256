"""The outlier-spreading notebook executes end to end (small sample)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat/nbclient are needed to execute the notebook")
nbclient = pytest.importorskip("nbclient", reason="nbformat/nbclient are needed to execute the notebook")
pytest.importorskip("transformers", reason="the notebook loads the default model with transformers")

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "outlier_spreading.ipynb"


def test_outlier_notebook_runs(tmp_path, monkeypatch):
    from turbokv.quality import model as model_mod
    from turbokv.quality.runner import default_text_path

    try:
        model_mod.default_model_path()
        default_text_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("TURBOKV_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    resources = {"metadata": {"path": str(tmp_path)}}
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources=resources)
    client.execute()  # raises CellExecutionError if any cell fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    images = sum(1 for o in outputs if "image/png" in o.get("data", {}))
    assert images >= 5, f"expected the notebook's figures, got {images} images"
    assert os.path.exists(tmp_path / "turbokv-notebook-sweep" / "sweep.csv")
