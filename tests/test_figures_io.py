"""Saving figures: HTML always; PNG offline through a local Chromium, or a clear warning without one."""
from __future__ import annotations

import plotly.graph_objects as go
import pytest

from lens_halluc.figures import io as fig_io
from lens_halluc.figures.heads import heads_heatmap


def _fig():
    rows = [{"layer": l, "head": h, "score": float(l - h)} for l in range(2) for h in range(3)]
    return heads_heatmap(rows, n_layers=2, n_heads=3, top_k=2)


def test_heatmap_marks_top_k():
    fig = _fig()
    marks = fig.data[1]
    assert list(zip(marks.y, marks.x)) == [(1, 0), (0, 0)]  # scores 1 and 0 (layer 1 head 0 first)


@pytest.mark.skipif(fig_io.find_browser() is None, reason="no local Chromium (make install provides one)")
def test_png_written_offline(tmp_path):
    files = fig_io.save_figure(_fig(), tmp_path / "f")
    assert [f.name for f in files] == ["f.html", "f.png"]
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "plotly.min.js").is_file()  # shared by every HTML figure in the folder


def test_no_browser_warns_and_keeps_html(tmp_path, monkeypatch):
    monkeypatch.setattr(fig_io, "find_browser", lambda: None)
    with pytest.warns(UserWarning, match="no Chromium found"):
        files = fig_io.save_figure(go.Figure(), tmp_path / "g")
    assert [f.name for f in files] == ["g.html"]
