"""Command line of the analyses: ``python -m lens_halluc.analysis SUBCOMMAND ...``.

Subcommands ``bias``, ``inheritance``, ``drift``, ``reweighting`` (``--attribution RUN_DIR --out DIR``)
and ``confounders`` (``--out DIR``). Each one is thin: flags → the organism defaults resolved here
(base LM, drift checkpoints, exported splits) → the :mod:`lens_halluc.analysis` function → its
result's ``save``, plus a few printed lines.

``--out`` (and reweighting's ``--work``) carry a marker (``.lens_halluc.json``): a directory holding
files we did not write is refused, and so is a second process writing the same directory.

Example
-------
    python -m lens_halluc.analysis bias --attribution runs/attribution_heads --out runs/bias
    python -m lens_halluc.analysis confounders --out runs/confounders --n-images 300 --highlight dog
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .common import add_model_args, friendly_errors, load_model_from_args, non_negative_int, positive_int

PROG = "python -m lens_halluc.analysis"


# ---------------------------------------------------------------------------- organism defaults
def is_organism(path) -> bool:
    """Whether a checkpoint path (None = default) is part of the shipped organism."""
    if path is None:
        return True
    from ..models.default import SHIPPED_DIR

    try:
        Path(path).resolve().relative_to(SHIPPED_DIR.resolve())
        return True
    except ValueError:
        return False


def model_for(args, run) -> str | None:
    """The VLM to analyse: ``--model`` if given, else the attribution run's model, else the organism."""
    if args.model is not None:
        return args.model
    if run.model is not None and Path(run.model).is_dir():
        return run.model
    return None


def organism_split_dir(name: str, model, root: Path, n: int) -> Path:
    """The organism's ``name`` split (``n`` images, its evaluation seed; normal: seed 1) exported once under ``root``."""
    from ..organism import EVAL_SEEDS, split_dir

    # normal: the training distribution with object boxes, seed 1 as the attribution run's break split
    seed = 1 if name == "normal" else EVAL_SEEDS[name]
    return split_dir(name, n=n, seed=seed, model=model, cache_dir=root)


# ---------------------------------------------------------------------------- subcommands
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attribution", type=Path, required=True,
                   help="--out directory of `python -m lens_halluc.attribute` (samples, tokens, head scores)")
    p.add_argument("--out", type=Path, required=True, help="directory for the CSV tables and figures")
    add_model_args(p)
    p.add_argument("--n-samples", type=positive_int, default=None, help="use the first N captions, N >= 1 (default: all)")
    p.add_argument("--k", type=positive_int, default=None,
                   help="number of hallucination heads, between 1 and the heads the run scored (default: the "
                        "reference's k for this analysis, lens_halluc.models.heads.HA_K: bias 20, inheritance 1, "
                        "drift 3, reweighting 20; a model with fewer heads, like the 48-head organism, needs its own)")
    p.add_argument("--no-png", action="store_true", help="skip the static PNG figures")


def _flavour_args(p: argparse.ArgumentParser, against: bool = True) -> None:
    from ..data.flavour import FLAVOURS

    p.add_argument("--flavour", choices=FLAVOURS, default="reference",
                   help="reference: the paper code's computation (default); corrected: our variant (FIDELITY.md)")
    if against:
        p.add_argument("--against", choices=("lowest", "others"), default=None,
                       help="compare the hallucination heads with the k lowest-scoring heads (reference flavour) "
                            "or with every other head (corrected flavour); default: the flavour's")


def check_k(args, run) -> None:
    """Refuse ``--k`` larger than the number of heads the attribution run scored."""
    n = len(run.head_scores)
    if args.k is not None and args.k > n:
        raise ValueError(f"--k {args.k} is more than the {n} heads scored in {args.attribution}; "
                         f"pass --k between 1 and {n}.")


def run_bias(args) -> object:
    """Compute, write ``bias.csv``, ``bias_summary.csv``, ``bias.html/.png``; return the result."""
    from ..analysis import as_attribution, bias
    from ..analysis._attention import resolve_k

    run = as_attribution(args.attribution)
    check_k(args, run)
    resolve_k(run, "bias", args.k)  # before the model loads
    args.model = model_for(args, run)
    vlm = load_model_from_args(args)
    res = bias(vlm, run, k=args.k, n_samples=args.n_samples)
    res.save(args.out, png=not args.no_png)
    for r in res.summary.to_dict("records"):
        print(f"{r['group']:>13} {'hallucinated' if r['hallucinated'] else 'real':>12}: image {r['image_mass']:.3f} "
              f"text {r['text_mass']:.3f} text share {r['text_share']:.3f} ({r['n_tokens']} tokens)")
    return res


def run_inheritance(args) -> object:
    """Compute, write ``inheritance.csv``, ``inheritance_heads.csv``, ``inheritance_summary.csv`` and the figure."""
    from ..analysis import as_attribution, inheritance
    from ..analysis._attention import resolve_k
    from ..models.default import organism_path
    from ..models.loading import load_causal_lm

    run = as_attribution(args.attribution)
    check_k(args, run)
    resolve_k(run, "inheritance", args.k)  # before any model loads
    args.model = model_for(args, run)
    base = args.base
    if base is None:
        if not is_organism(args.model):
            raise ValueError("--base is required for a model other than the organism (LLaVA-1.5: lmsys/vicuna-7b-v1.5).")
        base = organism_path("base")
    vlm = load_model_from_args(args)
    base_lm = load_causal_lm(base, device=args.device, dtype=args.dtype, template=args.template,
                             trust_remote_code=args.trust_remote_code, device_map=getattr(args, "device_map", None))
    res = inheritance(vlm, base_lm, run, k=args.k, n_samples=args.n_samples, against=args.against,
                      flavour=args.flavour)
    res.save(args.out, png=not args.no_png)
    for r in res.summary.to_dict("records"):
        print(f"{r['group']:>13}: mean cosine {r['mean_cosine']:.3f} over {r['n_heads']} heads, {r['n_samples']} samples")
    return res


def run_drift(args) -> object:
    """Compute, write ``drift.csv``, ``drift_curve.csv``, ``drift_last.csv`` and the figure."""
    from ..analysis import as_attribution, drift
    from ..models.default import list_checkpoints, organism_path

    run = as_attribution(args.attribution)
    check_k(args, run)
    model = model_for(args, run)
    if (args.checkpoints is None or args.initial is None) and not is_organism(model):
        raise ValueError("--checkpoints and --initial are required for a model other than the organism.")
    ckpts = [Path(p) for p in args.checkpoints] if args.checkpoints else list_checkpoints()
    if not ckpts:
        raise ValueError("no checkpoints: pass --checkpoints P1 P2 ...")
    res = drift(args.initial or organism_path("projector"), ckpts, run, k=args.k, n_samples=args.n_samples,
                rows=args.rows, device=args.device, dtype=args.dtype, against=args.against, flavour=args.flavour)
    res.save(args.out, png=not args.no_png)
    for r in res.summary.to_dict("records"):
        print(f"{r['checkpoint']:>16} {r['group']:>13}: JS {r['js']:.4f} ({r['n_heads']} heads)")
    return res


def run_reweighting(args) -> object:
    """Compute, write ``reweighting.csv``, ``reweighting_summary.csv``, ``reweighting.html/.png``; return the result."""
    from ..analysis import as_attribution, reweighting

    from ..analysis._attention import resolve_k

    run = as_attribution(args.attribution)
    check_k(args, run)
    heads = run.heads(resolve_k(run, "reweight", args.k))  # checked before the model loads
    args.model = model_for(args, run)
    vlm = load_model_from_args(args)
    data = args.data if args.data is not None else organism_split_dir("break", args.model, args.work / "data", args.n_images)
    # one captions folder per (data, model) so runs on other splits never share resumed files
    tag = f"{Path(data).name}-{Path(str(args.model or 'organism')).name}"
    res = reweighting(vlm, data, heads, n_random=args.n_random, seed=args.seed, cache_dir=args.work / f"captions-{tag}",
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=not args.no_progress,
                      random_pool=args.random_pool, flavour=args.flavour)
    res.save(args.out, png=not args.no_png)
    for r in res.summary.to_dict("records"):
        if r["renormalize"] or r["alpha"] not in (0.0, 3.5):
            continue
        print(f"{r['key_group']:>5} α={r['alpha']:<4g} {r['group']:>13}: CHAIR_s {r['CHAIR_s']:.3f} "
              f"CHAIR_i {r['CHAIR_i']:.3f} Recall {r['Recall']:.3f} partner {r['partner_rate']:.3f}")
    return res


CONFOUNDERS_DESCRIPTION = "Visual and text confounders per layer: category means, PCA views and separability numbers."


def _confounders_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--data", type=Path, default=None,
                   help="exported organism split or COCO-format dir with objects.json "
                        "(default: export the organism's normal split into OUT/data)")
    d.add_argument("--n-images", type=positive_int, default=300, help="images used (the first N, N >= 1)")
    d.add_argument("--prompt", default=None, help="user prompt before the caption (default: the captioning prompt)")
    d.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (>= 1)")
    a = p.add_argument_group("analysis")
    a.add_argument("--layers", type=non_negative_int, nargs="*", default=None,
                   help="hidden-state indices (0 = projector output/embeddings, l = decoder layer l; default all)")
    a.add_argument("--highlight", default=None,
                   help="category name to highlight in the PCA figures (default: the first pair's A, else the most frequent)")
    a.add_argument("--n-partners", type=non_negative_int, default=3, help="most co-occurring partners highlighted (>= 0)")
    a.add_argument("--pca-layer", type=non_negative_int, default=None, help="layer of the PCA figures (>= 0; default: the last)")
    a.add_argument("--n-pairs", type=positive_int, default=10,
                   help="co-occurring pairs used when the data has no pairs.json (>= 1)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("runs/confounders"), help="output directory")
    o.add_argument("--no-png", action="store_true", help="skip the static PNGs")
    o.add_argument("--no-progress", action="store_true")


def run_confounders(args) -> object:
    """Write in ``args.out``: ``separability.csv``, ``confounders_summary.csv``, ``confounders.npz``,
    ``pca_{visual,text}_{2d,3d}.csv``, the figures and ``manifest.json``; return the result."""
    from ..analysis import confounders

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data_dir = args.data if args.data is not None else organism_split_dir("normal", args.model, out / "data", args.n_images)
    vlm = load_model_from_args(args)
    res = confounders(vlm, data_dir, n_images=args.n_images, layers=args.layers, prompt=args.prompt,
                      batch_size=args.batch_size, highlight=args.highlight, n_partners=args.n_partners,
                      pca_layer=args.pca_layer, n_pairs=args.n_pairs, progress=not args.no_progress)
    res.save(out, png=not args.no_png)
    print(f"{'modality':8} {'layer':>5} {'silhouette':>10} {'scatter':>8} {'pair/other':>10} {'rank':>5} {'n':>5} {'C':>3}")
    for r in res.table.to_dict("records"):
        print(f"{r['modality']:8} {r['layer']:5d} {r['silhouette']:10.3f} {r['scatter_ratio']:8.3f} "
              f"{r['pair_distance_ratio']:10.3f} {r['pair_rank']:5.2f} {r['n_instances']:5d} {r['n_categories']:3d}")
    return res


def build_parser() -> argparse.ArgumentParser:
    """The parser with every subcommand (``func`` set on each)."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", metavar="{bias,inheritance,drift,confounders,reweighting}")

    s = sub.add_parser("bias", help="image vs text attention at object tokens, per head group",
                       description="Attention bias: do heads look at the image or at earlier text when an object word is predicted?")
    _common(s)
    s.set_defaults(func=run_bias)

    s = sub.add_parser("inheritance", help="text-to-text attention: VLM vs its base language model",
                       description="Inheritance: is a head's text-to-text attention the one its base language model already had?")
    _common(s)
    s.add_argument("--base", default=None,
                   help="base language model (default: the organism's base LM; for LLaVA-1.5 pass lmsys/vicuna-7b-v1.5)")
    _flavour_args(s)
    s.set_defaults(func=run_inheritance)

    s = sub.add_parser("drift", help="JS divergence of attention across instruction-tuning checkpoints",
                       description="Drift: how far each head's attention moves from the initial model during instruction tuning.")
    _common(s)
    s.add_argument("--checkpoints", nargs="+", default=None,
                   help="instruction-tuning checkpoints in training order (default: the organism's)")
    s.add_argument("--initial", default=None,
                   help="initial model, base LM + stage-1 projector (default: the organism's projector stage)")
    s.add_argument("--rows", choices=("all", "text"), default="all", help="query rows averaged")
    _flavour_args(s)
    s.set_defaults(func=run_drift)

    s = sub.add_parser("confounders", help=CONFOUNDERS_DESCRIPTION, description=CONFOUNDERS_DESCRIPTION,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _confounders_args(s)
    s.set_defaults(func=run_confounders)

    s = sub.add_parser("reweighting", help="CHAIR vs attention re-weighting of hallucination / random heads",
                       description="Attention re-weighting (Fig. 6): scale one key group of chosen heads and measure CHAIR.")
    _common(s)
    s.add_argument("--data", type=Path, default=None,
                   help="split directory (instances.json, captions.json, images/, optional probes.json); default: "
                        "the organism's held-out break split, exported under --work")
    s.add_argument("--n-images", type=positive_int, default=100, help="images of the exported break split (>= 1; default: 100)")
    s.add_argument("--n-random", type=positive_int, default=3, help="random-head draws (>= 1; default: 3)")
    s.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random-head draws (>= 0; default: 0)")
    s.add_argument("--max-new-tokens", type=positive_int, default=40, help="caption length limit (>= 1; default: 40)")
    s.add_argument("--batch-size", type=positive_int, default=50, help="captioning batch size (>= 1; default: 50)")
    s.add_argument("--work", type=Path, default=Path("runs/reweighting"),
                   help="folder for the exported split and the resumable captions (default: runs/reweighting)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--random-pool", choices=("all", "others"), default=None,
                   help="draw random heads among every head (reference flavour) or among the heads that are not "
                        "hallucination heads (corrected flavour); default: the flavour's")
    _flavour_args(s, against=False)
    s.set_defaults(func=run_reweighting)
    return p


# the table each subcommand always writes: a directory without a marker that holds it (and only files an
# analysis writes) was written by this analysis (the API's save, or a run from before markers) and is taken as ours
ADOPT_SIGNATURE = {"bias": "bias.csv", "inheritance": "inheritance.csv", "drift": "drift.csv",
                   "confounders": "separability.csv", "reweighting": "reweighting.csv"}


def main(argv: Sequence[str] | None = None):
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its result.

    Example
    -------
    >>> main(["bias", "--attribution", "runs/demo", "--out", "runs/bias", "--n-samples", "20"])   # doctest: +SKIP
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        raise SystemExit(2)
    from contextlib import ExitStack

    from ..data.outputs import output_dir

    with friendly_errors(f"{PROG} {args.command}"), ExitStack() as stack:
        # every directory we write is ours (marker), one writer at a time; the reweighting --work folder too
        adopt = (ADOPT_SIGNATURE[args.command], "*.csv", "*.html", "*.png", "*.json", "*.npz", "plotly.min.js", "data")
        stack.enter_context(output_dir(args.out, f"analysis-{args.command}", adopt=adopt))
        work = getattr(args, "work", None)
        if work is not None and Path(work).resolve() != Path(args.out).resolve():
            stack.enter_context(output_dir(work, f"analysis-{args.command}-work", flag="--work",
                                           adopt=("data", "captions-*")))
        return args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
