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


# ---- robust PNG export (issue 16: "JavascriptError: kaleido_scopes is not defined" in make figures) ----

needs_browser = pytest.mark.skipif(fig_io.find_browser() is None, reason="no local Chromium (make install provides one)")


def _fig3d():
    from lens_halluc.figures.confounders import pca_scatter_3d

    names = ["person", "dog", "cat", "clock", "sink", "fork"]
    rows = [{"category_id": i + 1, "name": n, "pc1": float(i), "pc2": float((i * 7) % 5), "pc3": float((i * 3) % 4),
             "explained_pc1": 0.5, "explained_pc2": 0.2, "explained_pc3": 0.1} for i, n in enumerate(names)]
    return pca_scatter_3d(rows, highlight=2, partners=[3])


class _FakeKaleido:
    """Stands in for kaleido.Kaleido: fails ``fail`` renders, then returns ``png``."""

    def __init__(self, log, fail, png=fig_io.PNG_MAGIC + b"fake"):
        self.log, self.fail, self.png = log, fail, png

    async def calc_fig(self, spec, opts=None):
        self.log.append("render")
        if self.log.count("render") <= self.fail:
            from kaleido._kaleido_tab._errors import JavascriptError

            raise JavascriptError("ReferenceError: kaleido_scopes is not defined")
        return self.png

    async def close(self):
        self.log.append("close")


def _fake_exporter(fail, attempts=3):
    log = []

    class Fake(fig_io.PngExporter):
        def _open(self):  # a "fresh Chromium" per open, without a browser
            self._start_loop()
            log.append("open")
            self._kaleido = _FakeKaleido(log, fail)

    exporter = Fake("fake-chromium", attempts=attempts)
    return exporter, log


def test_failed_render_is_retried_on_a_fresh_browser_and_logged(caplog):
    exporter, log = _fake_exporter(fail=2)
    with caplog.at_level("WARNING", logger="lens_halluc.figures.io"):
        png = exporter.render(go.Figure(), name="figs/x.png")
    exporter.close()
    assert png.startswith(fig_io.PNG_MAGIC)
    assert log.count("open") == 3 and log.count("render") == 3  # two failures, each followed by a new browser
    assert exporter.restarts_ == 2
    retries = [r.getMessage() for r in caplog.records]
    assert len(retries) == 2 and all("figs/x.png" in m and "kaleido_scopes" in m for m in retries)
    assert "attempt 1 of 3" in retries[0] and "attempt 2 of 3" in retries[1]


def test_export_gives_up_after_the_bounded_attempts_and_keeps_html(tmp_path, monkeypatch):
    exporter, log = _fake_exporter(fail=99, attempts=3)
    monkeypatch.setattr(fig_io, "find_browser", lambda: "fake-chromium")
    monkeypatch.setattr(fig_io, "png_exporter", lambda browser: exporter)
    with pytest.raises(RuntimeError, match=r"f\.png: PNG export failed 3 times .*kaleido_scopes.*png=False"):
        fig_io.save_figure(go.Figure(), tmp_path / "f")
    assert log.count("render") == 3  # bounded: no fourth try
    assert (tmp_path / "f.html").is_file() and not (tmp_path / "f.png").exists()
    assert not list(tmp_path.glob(".f.png.*"))  # no temp file left behind


def test_attempts_must_be_positive():
    with pytest.raises(ValueError, match="attempts=0"):
        fig_io.PngExporter("chromium", attempts=0)


def test_png_is_written_whole(tmp_path):
    (tmp_path / "a.png").write_bytes(b"old")
    fig_io.write_bytes_atomic(tmp_path / "a.png", fig_io.PNG_MAGIC + b"new")
    assert (tmp_path / "a.png").read_bytes() == fig_io.PNG_MAGIC + b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


@needs_browser
def test_real_retry_after_a_kaleido_scopes_error_gives_the_same_png():
    opened = []

    class Flaky(fig_io.PngExporter):
        def _open(self):
            super()._open()
            opened.append(1)
            if len(opened) == 1:  # the first Chromium's page "has no kaleido_scopes"
                async def broken(*a, **k):
                    from kaleido._kaleido_tab._errors import JavascriptError

                    raise JavascriptError("ReferenceError: kaleido_scopes is not defined")
                self._kaleido.calc_fig = broken

    flaky = Flaky(fig_io.find_browser())
    try:
        got = flaky.render(_fig(), 300, 200, 1)
    finally:
        flaky.close()
    assert len(opened) == 2 and flaky.restarts_ == 1
    assert got == fig_io.png_exporter(fig_io.find_browser()).render(_fig(), 300, 200, 1)


@needs_browser
def test_png_bytes_equal_across_exports_and_sessions(tmp_path):
    """2-D and 3-D figures exported in a loop, with a browser restart in between: byte-identical PNGs."""
    figs = {"heat": _fig(), "pca3d": _fig3d()}
    seen = {}
    for round_ in range(3):
        if round_ == 2:
            fig_io.png_exporter(fig_io.find_browser()).close()  # a fresh Chromium must draw the same bytes
        for name, f in figs.items():
            fig_io.save_figure(f, tmp_path / f"r{round_}" / name, width=500, height=400)
            data = (tmp_path / f"r{round_}" / f"{name}.png").read_bytes()
            assert data.startswith(fig_io.PNG_MAGIC)
            assert seen.setdefault(name, data) == data, f"{name} round {round_}"


# ---- figure layout fixes ----

def test_inheritance_colour_bar_stays_off_the_box_plot():
    from lens_halluc.figures.inheritance import inheritance_figure

    rows = [{"layer": l, "head": h, "group": "hallucination" if h == 0 else "other", "cosine": 0.1 * (l + h)}
            for l in range(3) for h in range(4)]
    fig = inheritance_figure(rows, n_layers=3, n_heads=4)
    cb = fig.data[0].colorbar
    heat, box = fig.layout.xaxis.domain, fig.layout.xaxis2.domain
    assert cb.orientation == "h" and cb.yanchor == "top" and cb.y < 0  # under the heatmap's axis
    lo, hi = cb.x - cb.len / 2, cb.x + cb.len / 2
    assert heat[0] - 1e-9 <= lo and hi <= heat[1] + 1e-9 < box[0]
    assert fig.layout.legend.y < 0  # the legend does not sit over the subplot titles either


def test_3d_pca_leaves_room_for_labels():
    fig = _fig3d()
    scene = fig.layout.scene
    eye = scene.camera.eye
    assert (eye.x ** 2 + eye.y ** 2 + eye.z ** 2) ** 0.5 > 3 ** 0.5 * 1.25  # farther than plotly's default camera
    for axis, key in ((scene.xaxis, "x"), (scene.yaxis, "y"), (scene.zaxis, "z")):
        vals = [v for tr in fig.data for v in getattr(tr, key)]
        span = max(vals) - min(vals)
        assert axis.range[0] <= min(vals) - 0.1 * span and axis.range[1] >= max(vals) + 0.1 * span
    assert scene.xaxis.title.text.startswith("PC1") and scene.zaxis.title.text.startswith("PC3")


# ---- progress bars (drift, re-weighting) ----

class _Spec:
    n_layers, n_heads = 2, 2

    def check_heads(self, heads):
        return [tuple(h) for h in heads]


class _Model:
    spec = _Spec()
    model = None


def test_drift_shows_a_progress_bar_unless_disabled(monkeypatch, capsys):
    import torch

    from lens_halluc.analysis import _drift

    att = torch.softmax(torch.zeros(2, 2, 3, 3), -1)
    monkeypatch.setattr(_drift, "attention_maps", lambda model, ids, **kw: att)
    monkeypatch.setattr(_drift, "sample_inputs", lambda vlm, s: {})
    samples = [{"sample_id": i, "input_ids": [1, 2, 3]} for i in range(3)]
    rows = _drift.attention_drift(_Model(), {"c1": _Model(), "c2": _Model()}, samples, progress=True)
    assert len(rows) == 2 * 4
    err = capsys.readouterr().err
    assert "drift" in err and "6/6" in err  # 2 checkpoints × 3 samples
    _drift.attention_drift(_Model(), {"c1": _Model()}, samples, progress=False)
    assert "drift" not in capsys.readouterr().err


def test_reweighting_shows_a_progress_bar_unless_disabled(monkeypatch, capsys, tmp_path):
    import contextlib

    from lens_halluc.analysis import _reweighting
    from lens_halluc.hooks import attention

    from conftest import write_toy_coco

    monkeypatch.setattr(attention, "editable_attention", lambda vlm: contextlib.nullcontext())
    scorer = lambda vlm, ds, out, strategy, mnt, bs: {"CHAIR_s": 0.0, "CHAIR_i": 0.0, "Recall": 1.0, "n": 1}  # noqa: E731
    data = write_toy_coco(tmp_path / "coco", n_images=2)
    kw = dict(alphas_text=(0.0, 1.0), alphas_image=(2.0,), n_random=0, renormalize=(False,), scorer=scorer)
    rows = _reweighting.reweighting_curves(_Model(), data, [(0, 1)], out_dir=tmp_path / "a", progress=True, **kw)
    assert len(rows) == 3
    err = capsys.readouterr().err
    assert "re-weighting" in err and "3/3" in err  # baseline + 2 edited configurations
    _reweighting.reweighting_curves(_Model(), data, [(0, 1)], out_dir=tmp_path / "b", progress=False, **kw)
    assert "re-weighting" not in capsys.readouterr().err
