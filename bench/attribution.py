"""Benchmark: naive per-head ablation loop vs the exact batched head attribution.

Default (CPU, seconds): a random tiny LLaVA shaped like the model organism (4 layers × 8 heads),
one random caption with several targets; times the naive loop and the batched method for the
local and global scopes, checks that they agree (max abs difference) and prints the speed-up.

    python bench/attribution.py                          # tiny model, CPU, float32
    python bench/attribution.py --model PATH             # any saved checkpoint (e.g. the organism)
    python bench/attribution.py --llava7b --device cuda --dtype bfloat16   # LLaVA-1.5-7B shape
    python bench/attribution.py --shape qwen2_vl --device cuda --dtype bfloat16    # Qwen2-VL-7B shape
    python bench/attribution.py --shape llava_next --device cuda --dtype bfloat16  # LLaVA-NeXT-7B shape
    python bench/attribution.py --family gemma3          # a zoo family's tiny model, CPU

``--llava7b`` builds the LLaVA-1.5-7B architecture (CLIP ViT-L/14-336, Llama-2-7B text tower:
32 layers × 32 heads, hidden 4096, intermediate 11008, vocab 32064) with random weights and a
706-token input (576 image tokens), and measures (a) the per-head loop for one target (on
``--loop-heads`` sampled heads, extrapolated to all heads), (b) all heads for one target in one
batched pass, (c) the amortised per-target time with ``--n-targets`` targets sharing the cached
prefix, plus (optionally) the global scope. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from lens_halluc.attribution import exact_influences, naive_influences
from lens_halluc.hooks.ablation import ablate_heads
from lens_halluc.models.compat import cache_from_output, cache_kwargs
from lens_halluc.models.loading import LoadedVLM
from lens_halluc.models.prompts import get_template
from lens_halluc.models.spec import ModelSpec


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=1):
    """(best seconds over ``repeats`` runs, last result)."""
    best, out = math.inf, None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


# ------------------------------------------------------------------------------------------ models
def tiny_case(args):
    """A tiny LLaVA (or a saved checkpoint), one random image, prompt + random caption."""
    import numpy as np
    from PIL import Image

    from lens_halluc.models import load_vlm
    from lens_halluc.models.tiny import make_tiny_llava

    dtype = getattr(torch, args.dtype)
    if args.model:
        vlm = load_vlm(args.model, device=args.device, dtype=dtype, attn_implementation=args.attn)
    elif args.family:
        import tempfile

        from lens_halluc.models.zoo import save_tiny

        with tempfile.TemporaryDirectory() as tmp:
            vlm = load_vlm(save_tiny(args.family, tmp), device=args.device, dtype=dtype, attn_implementation=args.attn)
    else:
        model, processor = make_tiny_llava(seed=0, n_layers=4, n_heads=8, n_kv_heads=8, hidden_size=128,
                                           intermediate_size=256)
        model.set_attn_implementation({"text_config": args.attn})
        model.to(device=args.device, dtype=dtype).eval()
        vlm = LoadedVLM(model=model, processor=processor, spec=ModelSpec.from_model(model),
                        template=get_template("llava-1.5"))
    rng = np.random.default_rng(args.seed)
    crop = getattr(vlm.processor.image_processor, "crop_size", None)
    size = int(crop["height"]) if crop and crop.get("height") else 48
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    enc = vlm.encode([image], ["Please describe this image in detail."])
    special = {*vlm.spec.image_token_ids, *vlm.spec.structure_token_ids, *vlm.tokenizer.all_special_ids}
    words = [i for i in range(min(len(vlm.tokenizer), vlm.spec.vocab_size)) if i not in special]
    caption = torch.as_tensor(rng.choice(words, args.caption_len), device=vlm.device)[None]
    start = enc["input_ids"].shape[1]
    inputs = vlm.adapter.extend_inputs(vlm.adapter.model_inputs(enc), caption)
    ids = inputs.pop("input_ids")[0]
    inputs.pop("attention_mask", None)
    return vlm, ids, inputs.pop("pixel_values", None), start, inputs


def llava7b_case(args):
    """LLaVA-1.5-7B architecture, random weights, built directly on the device; 706 tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    # --smoke: same shapes of input (336 px, 576 image tokens, 706 tokens, vocab 32064), tiny widths
    # and depths, to check this code path on a CPU.
    v = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2) if args.smoke else \
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
    t = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if args.smoke else \
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    vision = CLIPVisionConfig(**v, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(**t, num_key_value_heads=t["num_attention_heads"], vocab_size=32064,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=32001)
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.set_attn_implementation({"text_config": args.attn})
    model.eval()
    vlm = LoadedVLM(model=model, processor=None, spec=ModelSpec.from_model(model), template=get_template("llava-1.5"))
    g = torch.Generator().manual_seed(args.seed)
    n_image, n_before = 576, 35  # LLaVA-1.5: system prompt, 576 image tokens, instruction + caption
    n_after = args.seq_len - n_image - n_before
    ids = torch.cat([torch.tensor([1]), torch.randint(3, 32000, (n_before - 1,), generator=g),
                     torch.full((n_image,), 32000), torch.randint(3, 32000, (n_after,), generator=g)])
    pixel_values = torch.randn(1, 3, 336, 336, generator=g).to(args.device, dtype)
    caption_start = n_before + n_image + 20  # ~20 instruction tokens before the caption
    return vlm, ids.to(args.device), pixel_values, caption_start


def shape_case(args):
    """A zoo family's full-size architecture (``zoo.<family>.full_config()``: Qwen2-VL-7B, LLaVA-NeXT-7B) with random
    weights built on the device; one image through the family's processor at the real geometry, a random caption.

    Returns ``(vlm, ids, pixel_values, caption_start, model_kwargs)``; model_kwargs hold the family's other image
    inputs (``image_grid_thw``, ``mm_token_type_ids``, ``image_sizes``), extended over the caption."""
    import numpy as np
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from lens_halluc.models.adapters import adapter_for
    from lens_halluc.models.zoo import family_module

    zoo = family_module(args.shape)
    config = zoo.full_config(smoke=args.smoke)
    processor = zoo.full_processor()
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.set_attn_implementation({"text_config": args.attn})
    model.eval()
    adapter = adapter_for(model)
    rng = np.random.default_rng(args.seed)
    w, h = args.image_size
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    enc = processor(images=adapter.processor_images([image]), text=[adapter.format_prompt(processor, "Describe.")],
                    return_tensors="pt")
    # The tiny tokenizer's image token stands for the config's (the only id the forward matches on).
    tiny_image = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    real_image = adapter.image_token_ids(model)[0]
    enc["input_ids"][enc["input_ids"] == tiny_image] = real_image
    inputs = adapter.model_inputs(enc)
    g = torch.Generator().manual_seed(args.seed)
    caption = torch.randint(3, min(len(processor.tokenizer), real_image) - 1, (1, args.caption_len), generator=g)
    start = inputs["input_ids"].shape[1]
    inputs = adapter.extend_inputs(inputs, caption)
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    ids = inputs.pop("input_ids")[0]
    inputs.pop("attention_mask", None)
    pix = inputs.pop("pixel_values").to(dtype)
    vlm = LoadedVLM(model=model, processor=processor, spec=ModelSpec.from_model(model), template=None)
    return vlm, ids, pix, start, inputs


@torch.no_grad()
def floor(vlm, ids, pix, chunk, dev, repeats, **kw):
    """Times of the plain computations the batched method cannot avoid (see ``bench_7b``)."""
    model, spec = vlm.model, vlm.spec
    lm = spec.language_model(model)
    head = model.get_output_embeddings()
    T = len(ids)
    out = model(input_ids=ids[None], pixel_values=pix, use_cache=True, **kw)
    cache = cache_from_output(out)
    g = torch.Generator().manual_seed(1)
    new_ids = torch.randint(3, 32000, (1, chunk), generator=g).to(dev)
    emb = lm.get_input_embeddings()(new_ids)
    pos = torch.arange(T, T + chunk, device=dev)[None]

    if vlm.spec.adapter.positions_by_model:  # M-RoPE: the text positions on every axis (no image in the chunk)
        pos = pos[None].expand(3, -1, -1)

    def one_chunk():
        hid = lm(inputs_embeds=emb, **cache_kwargs(lm, cache), position_ids=pos, use_cache=True).last_hidden_state
        cache.crop(-chunk)
        return torch.log_softmax(head(hid).float(), -1)

    one_chunk()
    t_prefix, _ = timed(lambda: model(input_ids=ids[None], pixel_values=pix, use_cache=True, **kw), dev, repeats)
    t_chunk, _ = timed(one_chunk, dev, repeats)
    return {"floor_prefix_forward_s": t_prefix, "floor_chunk_forward_s": t_chunk,
            "floor_one_target_s": t_prefix + t_chunk, "floor_chunk_tokens": chunk}


def pick_targets(ids, caption_start, n):
    T = len(ids)
    n = min(n, T - caption_start)
    return torch.linspace(caption_start, T - 1, n).round().long().unique().tolist()


# ------------------------------------------------------------------------------------------ benches
def bench_tiny(args):
    vlm, ids, pix, start, kw = tiny_case(args)
    spec, dev = vlm.spec, args.device
    targets = pick_targets(ids, start, args.n_targets)
    print(f"model: {args.family or args.model or 'tiny llava'}, {spec.n_layers} layers × {spec.n_heads} heads, T = {len(ids)} tokens, {len(targets)} targets, "
          f"device {dev}, {args.dtype}, attention {args.attn}, threads {torch.get_num_threads()}")
    report = {}
    for scope in args.scopes:
        opts = dict(scope=scope, ablation="zero", metric="prob_diff")
        exact_influences(vlm, ids, pix, targets, chunk_size=args.chunk_size, **opts, **kw)  # warm-up
        t_naive, ref = timed(lambda: naive_influences(vlm, ids, pix, targets, **opts, **kw), dev, args.repeats)
        t_exact, got = timed(lambda: exact_influences(vlm, ids, pix, targets, chunk_size=args.chunk_size, **opts, **kw),
                             dev, args.repeats)
        diff = float((got.influence - ref.influence).abs().max())
        n_fwd = 1 + (len(targets) if scope == "local" else 1) * spec.n_total_heads
        report[scope] = dict(naive_s=t_naive, exact_s=t_exact, speedup=t_naive / t_exact, max_abs_diff=diff,
                             naive_forwards=n_fwd, max_abs_influence=float(ref.influence.abs().max()),
                             control_gap=got.control_gap)
        print(f"[{scope}] naive loop ({n_fwd} forwards) {t_naive * 1e3:9.1f} ms | exact batched "
              f"{t_exact * 1e3:8.1f} ms | speed-up {t_naive / t_exact:6.1f}x | max |exact - naive| {diff:.2e} "
              f"(max |I| {report[scope]['max_abs_influence']:.2e}, control gap {got.control_gap:.1e})")
    return report


def bench_7b(args):
    if args.shape:
        vlm, ids, pix, start, kw = shape_case(args)
        name = f"{args.shape} full-size shape"
    else:
        (vlm, ids, pix, start), kw = llava7b_case(args), {}
        name = "LLaVA-1.5-7B shape"
    spec, dev, model = vlm.spec, args.device, vlm.model
    T, n_heads = len(ids), spec.n_total_heads
    t1 = start + 5
    n_image = int(torch.isin(ids, torch.tensor(spec.image_token_ids, device=ids.device)).sum())
    print(f"{name} (random weights): {spec.n_layers}×{spec.n_heads} heads, T = {T} ({n_image} image tokens), "
          f"device {dev}, {args.dtype}, text attention {args.attn}")
    report = {}
    with torch.no_grad():
        fwd = lambda: model(input_ids=ids[None], pixel_values=pix, use_cache=False, **kw).logits  # noqa: E731
        fwd()
        report["forward_s"], _ = timed(fwd, dev, args.repeats)
        # (a) per-head loop for one target, on sampled heads
        g = torch.Generator().manual_seed(args.seed)
        sample = torch.randperm(n_heads, generator=g)[: args.loop_heads].tolist()
        heads = [(i // spec.n_heads, i % spec.n_heads) for i in sample]
        mask = torch.zeros(T, dtype=torch.bool, device=dev)
        mask[t1 - 1] = True
        loop_p = {}

        def loop():
            for lh in heads:
                with ablate_heads(model, spec, [lh], positions=mask):
                    logits = model(input_ids=ids[None], pixel_values=pix, use_cache=False, **kw).logits[0, t1 - 1]
                loop_p[lh] = torch.softmax(logits.float(), -1)[ids[t1]].item()
        with ablate_heads(model, spec, [heads[0]], positions=mask):  # warm-up of the hooked path
            model(input_ids=ids[None], pixel_values=pix, use_cache=False, **kw)
        t_loop, _ = timed(loop, dev, 1)
    per_head = t_loop / len(heads)
    report["a_per_head_s"] = per_head
    report["a_loop_one_target_all_heads_s_extrapolated"] = per_head * n_heads
    # (b) all heads, one target, one batched pass (prefix + 1 + n_heads copies)
    chunk = args.chunk_size or 1 + n_heads
    one = lambda: exact_influences(vlm, ids, pix, [t1], chunk_size=chunk, **kw)  # noqa: E731
    one()
    t_one, res = timed(one, dev, args.repeats)
    report["b_batched_one_target_s"] = t_one
    diffs = [abs(res.ablated[0, l, h].item() - loop_p[(l, h)]) for l, h in heads]
    report["b_vs_loop_max_abs_diff_p"] = max(diffs)
    report["b_control_gap"] = res.control_gap
    report["speedup_one_target"] = per_head * n_heads / t_one
    # (c) many targets sharing the cached prefix
    targets = pick_targets(ids, start, args.n_targets)
    t_many, res_many = timed(lambda: exact_influences(vlm, ids, pix, targets, chunk_size=chunk, **kw), dev, 1)
    report["c_n_targets"] = len(targets)
    report["c_total_s"] = t_many
    report["c_amortised_per_target_s"] = t_many / len(targets)
    report["c_control_gap"] = res_many.control_gap
    for cs in args.chunk_sweep:
        t_cs, _ = timed(lambda: exact_influences(vlm, ids, pix, targets, chunk_size=cs, **kw), dev, 1)
        report[f"c_amortised_per_target_s_chunk{cs}"] = t_cs / len(targets)
    # Floor: the same work with nothing of ours in it -- the plain forward (with cache) that every
    # method needs, plus one plain text-tower pass of ``chunk`` new tokens against the cached prefix
    # (the FLOPs of one chunk of whole-tower copies) without hooks or 4-D mask. The staggered local
    # method runs the copy of head (l, h) through layers l..L-1 only: about half those FLOPs.
    report.update(floor(vlm, ids, pix, chunk, dev, args.repeats, **kw))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            exact_influences(vlm, ids, pix, targets[:4], chunk_size=chunk, **kw)
            _sync(dev)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    if "global" in args.scopes:
        t_glob, _ = timed(lambda: exact_influences(vlm, ids, pix, targets, scope="global", row_chunk=args.row_chunk, **kw),
                          dev, 1)
        report["global_exact_all_targets_s"] = t_glob
        report["global_naive_extrapolated_s"] = report["forward_s"] * n_heads
    for k, v in report.items():
        print(f"  {k:45s} {v:.4g}" if isinstance(v, float) else f"  {k:45s} {v}")
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--llava7b", action="store_true", help="LLaVA-1.5-7B architecture with random weights")
    ap.add_argument("--shape", default=None, choices=["qwen2_vl", "llava_next"],
                    help="a family's full-size architecture with random weights (Qwen2-VL-7B, LLaVA-NeXT-7B)")
    ap.add_argument("--image-size", default="672,336", help="--shape: width,height of the image (default 672,336)")
    ap.add_argument("--smoke", action="store_true",
                    help="with --llava7b/--shape: tiny widths, same input shapes (CPU check)")
    ap.add_argument("--model", default=None, help="checkpoint directory instead of the built-in tiny model")
    ap.add_argument("--family", default=None, help="a zoo family's tiny model (lens_halluc.models.zoo.FAMILIES)")
    ap.add_argument("--attn", default=None, help="text-tower attention: eager (tiny default) or sdpa (7B default)")
    ap.add_argument("--n-targets", type=int, default=None, help="targets per caption (tiny: 6, 7B: 40)")
    ap.add_argument("--caption-len", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=706, help="7B: total tokens (576 image)")
    ap.add_argument("--chunk-size", type=int, default=None, help="copies per forward (7B default 1 + heads)")
    ap.add_argument("--row-chunk", type=int, default=None, help="global scope: rows per replay")
    ap.add_argument("--loop-heads", type=int, default=32, help="7B: heads timed in the per-head loop")
    ap.add_argument("--scopes", default=None, help="comma list: local,global (7B default: local)")
    ap.add_argument("--chunk-sweep", default="", help="7B: comma list of extra chunk sizes timed for (c)")
    ap.add_argument("--profile", action="store_true", help="7B: print a torch.profiler table of 4 targets")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (small: cores are shared)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the numbers to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.image_size = tuple(int(v) for v in args.image_size.split(","))
    args.llava7b = args.llava7b or bool(args.shape)  # the full-size bench, on the chosen shape
    args.attn = args.attn or ("sdpa" if args.llava7b else "eager")
    args.n_targets = args.n_targets or (40 if args.llava7b else 6)
    args.chunk_sweep = [int(c) for c in args.chunk_sweep.split(",") if c]
    args.scopes = (args.scopes or ("local" if args.llava7b else "local,global")).split(",")
    if args.llava7b:
        report = bench_7b(args)
    else:
        args.chunk_size = args.chunk_size or 1024
        report = bench_tiny(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
