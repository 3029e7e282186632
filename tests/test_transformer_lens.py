"""The attention-bias numbers agree across backends: plain eager ``output_attentions``, TransformerLens'
``TransformerBridge`` (``blocks.{l}.attn.hook_pattern``) and nnsight (``self_attn.output[1]``).

Also: images reach the bridge through the wrappers (and through TransformerLens' patching helpers via
:func:`with_images`), inputs with image tokens but no pixels are refused, and bridging leaves the
user's model untouched.
"""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("transformer_lens.model_bridge", reason="TransformerLens with TransformerBridge is not installed")

from lens_halluc.analysis import attention_bias, attention_maps, role_masses, sample_pixels, select_samples  # noqa: E402
from lens_halluc.models.transformer_lens import (  # noqa: E402
    ImagesMissingError, attention_patterns, run_with_cache_images, run_with_hooks_images, to_transformer_bridge,
    with_images,
)

TOL = 1e-5
N_SAMPLES = 4  # a few teacher-forced captions keep the test near a few seconds on 2 CPU cores


@pytest.fixture(scope="module")
def bridge(organism):
    return to_transformer_bridge(organism)


@pytest.fixture(scope="module")
def samples(attr_run):
    with_tokens = {int(t["sample_id"]) for t in attr_run.tokens}
    chosen = [s for s in select_samples(attr_run.samples, None) if int(s["sample_id"]) in with_tokens][:N_SAMPLES]
    assert chosen, "the attribution run found no object tokens"
    return chosen


def _nnsight_maps(vlm, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """``[L, H, T, T]`` from nnsight: eager LlamaAttention returns ``(attn_output, attn_weights)``.

    Layers are read in execution order (nnsight 0.8 raises OutOfOrderError otherwise); no_grad keeps
    the trace from building an autograd graph.
    """
    nnsight = pytest.importorskip("nnsight")
    model = nnsight.NNsight(vlm.model)
    layers = model.model.language_model.layers
    saved = []
    with torch.no_grad(), model.trace(input_ids=ids[None], pixel_values=pixels,
                                      attention_mask=torch.ones(1, len(ids), dtype=torch.long), use_cache=False):
        for l in range(vlm.spec.n_layers):
            saved.append(layers[l].self_attn.output[1].save())
    return torch.stack([torch.as_tensor(w)[0] for w in saved]).float().cpu()


def _bias_rows(vlm, samples, tokens, maps_fn) -> torch.Tensor:
    """``[n_tokens, L*H, 2]`` (image mass, text mass) per object token and head, in attention_bias' row order."""
    out = []
    for s in samples:
        ids = torch.tensor(s["input_ids"])
        roles = vlm.spec.token_roles(ids)[0]
        att = maps_fn(ids, sample_pixels(vlm, s))  # [L, H, T, T]
        for t in sorted((t for t in tokens if int(t["sample_id"]) == int(s["sample_id"])), key=lambda t: int(t["index"])):
            q = int(t["position"]) - 1  # the row that predicts the object token
            image, text = role_masses(att[:, :, q], roles, q)  # [L, H] each
            out.append(torch.stack([image.flatten(), text.flatten()], -1))
    return torch.stack(out)


def test_attention_bias_agrees_across_plain_transformer_lens_and_nnsight(organism, bridge, attr_run, samples):
    ids_ = {int(s["sample_id"]) for s in samples}
    tokens = [t for t in attr_run.tokens if int(t["sample_id"]) in ids_]
    # (a) the shipped numbers: attention_bias on the plain eager path
    table = attention_bias(organism, samples, tokens)
    plain = torch.tensor([[r["image_mass"], r["text_mass"]] for r in table]).reshape(len(tokens), -1, 2)
    # the same numbers rebuilt from the plain maps, to pin the row order used for the other paths
    rebuilt = _bias_rows(organism, samples, tokens, lambda i, p: attention_maps(organism.model, i, p))
    assert torch.equal(plain, rebuilt)
    # (b) TransformerLens
    via_tl = _bias_rows(organism, samples, tokens, lambda i, p: attention_patterns(bridge, i, p))
    d_tl = (via_tl - plain).abs().max().item()
    # (c) nnsight
    via_nn = _bias_rows(organism, samples, tokens, lambda i, p: _nnsight_maps(organism, i, p))
    d_nn = (via_nn - plain).abs().max().item()
    print(f"\n{len(tokens)} object tokens × {plain.shape[1]} heads; max |Δ| TransformerLens {d_tl:.2e}, nnsight {d_nn:.2e}")
    assert d_tl <= TOL and d_nn <= TOL
    assert plain[..., 0].max() > 0.01  # the image mass is not trivially zero, so agreement means something


def test_full_maps_agree_and_bridging_leaves_the_model_untouched(organism, bridge, samples):
    s = samples[0]
    ids, px = torch.tensor(s["input_ids"]), sample_pixels(organism, s)
    ref = attention_maps(organism.model, ids, px)  # still works: the bridge wraps a weight-sharing copy
    assert (attention_patterns(organism, ids, px) - ref).abs().max() <= TOL  # LoadedVLM in, cached bridge
    assert to_transformer_bridge(organism) is bridge
    assert bridge.original_model.lm_head.weight is organism.model.lm_head.weight  # no duplicated weights
    assert bridge.processor is organism.processor


def test_pixels_are_required_and_reach_the_model(organism, bridge, samples):
    s = samples[0]
    ids, px = torch.tensor(s["input_ids"]), sample_pixels(organism, s)
    with pytest.raises(ImagesMissingError, match="pixel_values"):
        run_with_cache_images(bridge, ids)
    with torch.no_grad():
        ref_logits = organism.model(input_ids=ids[None], pixel_values=px).logits
        enc = {"input_ids": ids[None], "pixel_values": px, "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        logits, cache = run_with_cache_images(bridge, enc, names_filter="blocks.0.attn.hook_pattern")
        assert list(cache.keys()) == ["blocks.0.attn.hook_pattern"]
        assert (logits - ref_logits).abs().max() <= 1e-4
        # what the wrappers prevent: the bare bridge without pixels runs on the image placeholder
        no_image = bridge(ids[None])
        assert (no_image - ref_logits).abs().max() > 1e-2
        hooked = run_with_hooks_images(bridge, enc, [])
        assert (hooked - ref_logits).abs().max() <= 1e-4


def test_patching_helper_sees_the_images_through_with_images(organism, bridge, samples):
    from transformer_lens import patching

    s = samples[0]
    ids, px = torch.tensor(s["input_ids"])[None], sample_pixels(organism, s)
    mask = torch.ones_like(ids)
    target = int(ids[0, -1])
    metric = lambda logits: logits[0, -2, target]  # noqa: E731  (scalar, as the helper expects)
    with torch.no_grad():
        clean_logits, clean_cache = run_with_cache_images(bridge, ids, pixel_values=px, attention_mask=mask)
        bound = with_images(bridge, px, mask)
        # clean cache patched into the same clean run: every head's patch leaves the metric unchanged,
        # which only holds if the helper's own forwards carried the image too
        effect = patching.get_act_patch_attn_head_out_all_pos(bound, ids, clean_cache, metric)
    assert effect.shape == (organism.spec.n_layers, organism.spec.n_heads)
    assert (effect - metric(clean_logits)).abs().max() <= 1e-4
