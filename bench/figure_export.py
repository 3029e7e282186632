"""Stress the PNG export that ``make figures`` uses: N figures (2-D and 3-D) exported R times in a row.

Each round writes every figure with :func:`lens_halluc.figures.io.save_figure` (one process, so
the shared Chromium session is reused as in ``make figures``) and checks that every PNG is
byte-identical to the first round's. Exit status 0 only when every export of every round passed;
retries (logged by ``lens_halluc.figures.io``) are counted and reported.

Run:  .venv/bin/python bench/figure_export.py --out /tmp/figstress --rounds 20 [--restart-each-round]
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from pathlib import Path

import numpy as np


def figures(n: int, n_3d: int) -> dict:
    """``n`` deterministic figures from the project's figure builders, ``n_3d`` of them 3-D PCA views."""
    from lens_halluc.figures.confounders import pca_scatter_2d, pca_scatter_3d, separability_lines
    from lens_halluc.figures.heads import heads_heatmap
    from lens_halluc.figures.inheritance import inheritance_figure

    rng = np.random.default_rng(0)
    names = ["person", "bicycle", "car", "dog", "cat", "bird", "horse", "cup", "fork", "bowl", "chair", "sink",
             "clock", "keyboard", "remote", "toilet", "frisbee", "umbrella", "elephant", "bottle"]
    out = {}
    for i in range(n):
        if i < n_3d:
            p, ev = rng.normal(scale=5, size=(len(names), 3)), [0.55, 0.2, 0.08]
            rows = [{"category_id": c + 1, "name": nm, "pc1": p[c, 0], "pc2": p[c, 1], "pc3": p[c, 2],
                     **{f"explained_pc{j + 1}": ev[j] for j in range(3)}} for c, nm in enumerate(names)]
            out[f"pca3d_{i:02d}"] = pca_scatter_3d(rows, highlight=4, partners=[13, 17, 20])
        elif i % 4 == 0:
            rows = [{"layer": l, "head": h, "score": float(rng.normal())} for l in range(6) for h in range(8)]
            out[f"heads_{i:02d}"] = heads_heatmap(rows, n_layers=6, n_heads=8, top_k=5)
        elif i % 4 == 1:
            rows = [{"layer": l, "head": h, "group": "hallucination" if (l * 8 + h) % 7 == 0 else "other",
                     "cosine": float(rng.uniform(0.1, 0.9))} for l in range(6) for h in range(8)]
            out[f"inheritance_{i:02d}"] = inheritance_figure(rows, n_layers=6, n_heads=8)
        elif i % 4 == 2:
            p = rng.normal(size=(len(names), 2))
            rows = [{"category_id": c + 1, "name": nm, "pc1": p[c, 0], "pc2": p[c, 1], "explained_pc1": 0.4,
                     "explained_pc2": 0.2} for c, nm in enumerate(names)]
            out[f"pca2d_{i:02d}"] = pca_scatter_2d(rows, highlight=4, partners=[13])
        else:
            rows = [{"modality": m, "layer": l, "silhouette": float(rng.normal()), "scatter_ratio": float(rng.uniform()),
                     "pair_distance_ratio": float(rng.uniform(0.5, 1.5))} for m in ("visual", "text") for l in range(7)]
            out[f"separability_{i:02d}"] = separability_lines(rows)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="scratch folder (overwritten figure by figure)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--figures", type=int, default=20)
    ap.add_argument("--n-3d", type=int, default=4)
    ap.add_argument("--restart-each-round", action="store_true",
                    help="close the shared Chromium after every round (exercises the first render of a fresh browser)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from lens_halluc.figures import io as fig_io

    if fig_io.find_browser() is None:
        print("no Chromium: nothing to stress (install one, or set BROWSER_PATH)", file=sys.stderr)
        return 2
    figs = figures(args.figures, args.n_3d)
    first: dict[str, str] = {}
    failures = 0
    t0 = time.time()
    for r in range(1, args.rounds + 1):
        t = time.time()
        for name, fig in figs.items():
            try:
                fig_io.save_figure(fig, args.out / name)
                digest = hashlib.sha256((args.out / f"{name}.png").read_bytes()).hexdigest()
            except Exception as e:  # count and go on: the point is how many of R×N fail
                failures += 1
                print(f"round {r} {name}: FAILED {type(e).__name__}: {e}", flush=True)
                continue
            if first.setdefault(name, digest) != digest:
                failures += 1
                print(f"round {r} {name}: PNG differs from round 1", flush=True)
        exp = fig_io._EXPORTER
        if args.restart_each_round and exp is not None:
            exp.close()
        print(f"round {r}/{args.rounds}: {len(figs)} figures in {time.time() - t:.1f} s, "
              f"failures so far {failures}, retries so far {exp.restarts_ if exp else 0}", flush=True)
    exp = fig_io._EXPORTER
    print(f"DONE {args.rounds} rounds × {len(figs)} figures ({args.n_3d} 3-D): {failures} failures, "
          f"{exp.restarts_ if exp else 0} retries, {time.time() - t0:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
