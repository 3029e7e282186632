"""The main job on the embedded default: ``python -m lens_halluc.demo`` (what ``make demo`` runs).

Exports a break split of the shipped organism's world (anchor A present, partner B absent),
captions it with the organism, scores the captions with CHAIR, reports how often the absent
partner B was hallucinated, and scores POPE (random vs adversarial) on normal images.
Everything lands in ``--out`` as tidy JSON/JSONL.

Example
-------
    python -m lens_halluc.demo --n 100 --out runs/demo
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lens_halluc.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="organism checkpoint (default: the shipped final model)")
    p.add_argument("--n", type=int, default=100, help="images per split")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from .organism.evaluate import EvalConfig, evaluate_organism
    from .organism.shipped import organism_path

    model = Path(args.model) if args.model else organism_path("final")
    cfg = EvalConfig(n=args.n, localisation=False)
    report = evaluate_organism(model, args.out, cfg, progress=not args.no_progress)
    lines = [
        f"model: {model}",
        f"normal split  CHAIR_s={report['normal']['CHAIR_s']:.3f} CHAIR_i={report['normal']['CHAIR_i']:.3f} "
        f"Recall={report['normal']['Recall']:.3f}",
        f"break split   partner B hallucinated in {report['break']['partner_rate']:.1%} of captions "
        f"(control: {report['control']['partner_rate']:.1%}); CHAIR_i={report['break']['CHAIR_i']:.3f}",
        "POPE accuracy " + "  ".join(f"{k}={v['accuracy']:.3f}" for k, v in report.get("pope", {}).items()),
        f"results: {args.out / 'report.json'} (captions-*.jsonl, pope-*-answers.jsonl beside it)",
    ]
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
