"""The editable attention and the interventions on every VLM family of the zoo.

For each family whose tiny model exists (``lens_halluc.models.zoo.<family>``; the others are skipped
with the reason):

* the editable ``"lens_halluc"`` attention equals eager: logits within 1e-5 and every layer's
  post-softmax weights equal eager's (read by a plain torch forward hook on each attention module
  under eager, compared with :func:`capture_attention`);
* the :class:`Identity` edit changes nothing; :class:`ScaleKeys` / :class:`ThresholdZeroText` change
  the logits on the layers that have the key group, and raise :class:`NotDefinedForArchitecture`
  (with the reason) on layers that have none (Mllama: no image keys in self-attention, only image
  keys in cross-attention);
* each intervention runs one decoding step or refuses clearly.

Family-independent unit checks of the attention function against the families' own eager functions
(Gemma 2 soft-capping, GPT-OSS sinks, GQA, boolean masks, dropout in training) come first.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from lens_halluc.hooks.attention import (Counterfactual, Identity, ScaleKeys, ThresholdZeroText, capture_attention,
                                         edit_attention, lens_halluc_attention_forward, set_text_attn_implementation,
                                         text_attn_implementation, use_editable_attention)
from lens_halluc.models.adapters import NotDefinedForArchitecture, adapter_for
from lens_halluc.models.spec import ModelSpec, TokenRole
from lens_halluc.models.zoo import FAMILIES, make_tiny

TOL = 1e-5


# ====================================================================== the function vs the families' eager
class _Mod(torch.nn.Module):
    def __init__(self, n_rep: int, sinks: torch.Tensor | None = None):
        super().__init__()
        self.num_key_value_groups = n_rep
        self.head_dim = 8
        if sinks is not None:
            self.sinks = torch.nn.Parameter(sinks)


def _qkv(seed=0, b=2, h=4, kv=2, q=5, k=5, d=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, q, d, generator=g), torch.randn(b, kv, k, d, generator=g),
            torch.randn(b, kv, k, d, generator=g))


def _causal_float(b, q, k, pad_first: int = 1):
    allowed = torch.ones(q, k).tril(k - q).bool()[None, None].expand(b, 1, q, k).clone()
    allowed[1, :, :, :pad_first] = False   # row 1 left-padded
    allowed[1, :, :pad_first, 0] = True    # keep a key for the padded queries (no all-masked row)
    return allowed, torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


def test_function_equals_gemma2_eager_with_softcap_and_gqa():
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager

    q, k, v = _qkv()
    _, mask = _causal_float(2, 5, 5)
    mod = _Mod(2).eval()
    for softcap in (None, 1.5):
        ref_out, ref_w = gemma2_eager(mod, q * 4, k, v, mask, scaling=0.3, softcap=softcap)
        out, w = lens_halluc_attention_forward(mod, q * 4, k, v, mask, scaling=0.3, softcap=softcap,
                                               sliding_window=3, position_ids=None)
        assert torch.equal(out, ref_out) and torch.equal(w, ref_w)
    # the soft-cap matters here (the test could fail): ignoring it changes the weights
    _, w_nocap = lens_halluc_attention_forward(mod, q * 4, k, v, mask, scaling=0.3)
    assert (w_nocap - ref_w).abs().max() > 1e-3


def test_function_equals_gpt_oss_eager_with_sinks():
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as oss_eager

    q, k, v = _qkv(1)
    _, mask = _causal_float(2, 5, 5)
    mod = _Mod(2, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0])).eval()
    ref_out, ref_w = oss_eager(mod, q, k, v, mask, scaling=0.35)
    out, w = lens_halluc_attention_forward(mod, q, k, v, mask, scaling=0.35, s_aux=mod.sinks)
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(w, ref_w, atol=1e-6)
    assert (w.sum(-1) < 1 - 1e-3).any()  # the sink took mass: the keyword was honoured


def test_function_bool_mask_and_training_dropout():
    from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

    q, k, v = _qkv(2)
    allowed, mask = _causal_float(2, 5, 5)
    mod = _Mod(2).eval()
    ref_out, ref_w = llama_eager(mod, q, k, v, mask, scaling=0.25)
    out, w = lens_halluc_attention_forward(mod, q, k, v, allowed, scaling=0.25)  # True = attend
    assert torch.equal(w, ref_w) and torch.equal(out, ref_out)
    mod.train()
    torch.manual_seed(3)
    ref_out, ref_w = llama_eager(mod, q, k, v, mask, scaling=0.25, dropout=0.5)
    torch.manual_seed(3)
    out, w = lens_halluc_attention_forward(mod, q, k, v, mask, scaling=0.25, dropout=0.5)
    assert torch.equal(w, ref_w) and (w == 0).any()
    mod.eval()  # no dropout outside training, whatever p
    _, w = lens_halluc_attention_forward(mod, q, k, v, mask, scaling=0.25, dropout=0.5)
    assert torch.allclose(w.sum(-1), torch.ones(()))


# ====================================================================== per family
_BUILT: dict = {}


class _Built:
    def __init__(self, family: str):
        from lens_halluc.models.loading import LoadedVLM

        model, processor = make_tiny(family, seed=0)
        self.family, self.model, self.processor = family, model, processor
        self.adapter = adapter_for(model)
        self.spec = ModelSpec.from_model(model, processor)
        self.vlm = LoadedVLM(model=model, processor=processor, spec=self.spec, template=None)
        text = self.adapter.format_prompt(processor, "describe this image in detail")
        img = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))
        enc = processor(images=self.adapter.processor_images([img]), text=[text], return_tensors="pt")
        self.encoding = dict(enc)
        self.inputs = self.adapter.model_inputs(enc)
        self.original = text_attn_implementation(self.vlm)

    def kinds(self):
        return self.spec.attention_kinds or ("self",) * self.spec.n_layers

    @torch.no_grad()
    def eager(self):
        """(logits, {layer: weights}) under eager, the weights read by a plain hook on each attention module."""
        set_text_attn_implementation(self.vlm, "eager")
        seen, handles = {}, []
        for layer in range(self.spec.n_layers):
            mod = self.spec.attention(self.model, layer)
            def record(module, args, out, layer=layer):
                seen.setdefault(layer, out[1])  # returns None: the output is left alone
            handles.append(mod.register_forward_hook(record))
        try:
            logits = self.model(**self.inputs).logits
        finally:
            for h in handles:
                h.remove()
        return logits, seen

    @torch.no_grad()
    def logits(self):
        return self.model(**self.inputs).logits


def built(family: str) -> _Built:
    if family not in _BUILT:
        _BUILT[family] = _Built(family)
    b = _BUILT[family]
    use_editable_attention(b.vlm)
    return b


@pytest.mark.capability("editable == eager")
@pytest.mark.parametrize("family", FAMILIES)
def test_editable_attention_equals_eager(family):
    b = built(family)
    eager_logits, eager_weights = b.eager()
    assert text_attn_implementation(b.vlm) == "eager"
    use_editable_attention(b.vlm)
    assert text_attn_implementation(b.vlm) == "lens_halluc"
    assert (b.logits() - eager_logits).abs().max() <= TOL
    for kind in sorted(set(b.kinds())):
        layers = [l for l, k in enumerate(b.kinds()) if k == kind and l in eager_weights]
        if not layers:
            continue
        got = capture_attention(b.vlm, b.inputs, layers=layers)
        for i, layer in enumerate(layers):
            assert got[i].shape == eager_weights[layer].shape
            assert (got[i] - eager_weights[layer]).abs().max() <= TOL, (family, layer)


@pytest.mark.parametrize("family", FAMILIES)
def test_switch_touches_only_the_text_tower(family):
    b = built(family)
    text_cfgs = {id(b.spec.attention(b.model, l).config) for l in range(b.spec.n_layers)}

    def other_implementations() -> dict:
        """Sub-config name -> attention implementation, for every config the text tower does not read."""
        out, stack = {}, [b.model.config]
        while stack:
            cfg = stack.pop()
            for key in getattr(cfg, "sub_configs", {}) or {}:
                sub = getattr(cfg, key, None)
                if sub is not None:
                    stack.append(sub)
                    if id(sub) not in text_cfgs:
                        out[key] = sub._attn_implementation
        return out

    others = other_implementations()
    set_text_attn_implementation(b.vlm, "eager")
    use_editable_attention(b.vlm)
    now = other_implementations()
    assert now == others  # vision tower / VQ-VAE keep their implementation
    assert text_attn_implementation(b.vlm) == "lens_halluc"


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_edit_changes_nothing_and_roles(family):
    b = built(family)
    base = b.logits()
    heads = [(l, h) for l in range(b.spec.n_layers) for h in range(b.spec.n_heads)]
    with edit_attention(b.vlm, Identity(), heads):
        same = b.logits()
    assert torch.equal(same, base)
    roles = b.spec.token_roles(b.inputs["input_ids"], b.inputs["attention_mask"])
    ids = b.inputs["input_ids"]
    image = torch.isin(ids, torch.tensor(b.spec.image_token_ids))
    assert torch.equal(roles == int(TokenRole.IMAGE), image)
    if b.spec.structure_token_ids:
        structure = torch.isin(ids, torch.tensor(b.spec.structure_token_ids))
        assert torch.equal(roles == int(TokenRole.IMAGE_STRUCTURE), structure)
        assert not (structure & (roles == int(TokenRole.TEXT))).any()


def _layers_with(b: _Built, groups) -> tuple[list[int], list[int]]:
    ok, refused = [], []
    for layer in range(b.spec.n_layers):
        reasons = [b.adapter.attention_key_group_reason(b.model, layer, g) for g in groups]
        (refused if any(reasons) else ok).append(layer)
    return ok, refused


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("edit", [ScaleKeys("image", 3.0), ScaleKeys("text", 0.0), ThresholdZeroText(0.0, rows="all")],
                         ids=["scale_image", "scale_text", "adhh"])
def test_key_group_edits_change_logits_or_refuse(family, edit):
    b = built(family)
    base = b.logits()
    ok, refused = _layers_with(b, edit.key_groups)
    if refused:
        with pytest.raises(NotDefinedForArchitecture, match="needs"):
            with edit_attention(b.vlm, edit, [(l, h) for l in refused for h in range(b.spec.n_heads)]):
                b.logits()
    if ok:
        with edit_attention(b.vlm, edit, [(l, h) for l in ok for h in range(b.spec.n_heads)]):
            edited = b.logits()
        assert (edited - base).abs().max() > 1e-4, (family, edit)


@pytest.mark.parametrize("family", FAMILIES)
def test_counterfactual_llm_attention_changes_logits(family):
    b = built(family)
    base = b.logits()
    with edit_attention(b.vlm, Counterfactual("uniform"),
                        [(l, h) for l in range(b.spec.n_layers) for h in range(b.spec.n_heads)]):
        edited = b.logits()
    assert (edited - base).abs().max() > 1e-4


# ---------------------------------------------------------------------- interventions, one step each
def _interventions():
    from lens_halluc.interventions import ADHH, OPERA, VCD, CausalMM, DoLa, HeadAblation, Reweight, SEEDContrast

    return {
        "adhh": lambda b: ADHH(_heads(b, ("text", "image")), tau=0.0, flavour="corrected"),
        "reweight_text": lambda b: Reweight(_heads(b, ("text",)), alpha=0.0, keys="text"),
        "reweight_image": lambda b: Reweight(_heads(b, ("image",)), alpha=3.0, keys="image"),
        "vcd": lambda b: VCD(strength=1.0, flavour="corrected"),
        "seed": lambda b: SEEDContrast(strength=1.0),
        "causalmm_llm": lambda b: CausalMM(llm="reverse", flavour="corrected"),
        "causalmm_vision": lambda b: CausalMM(vision="uniform", llm=None, vision_mode="attention", flavour="corrected"),
        "dola": lambda b: DoLa(candidate_layers=[0], flavour="corrected"),
        "ablate": lambda b: HeadAblation([(0, 0), (b.spec.n_layers - 1, 1)]),
        "opera": lambda b: OPERA(num_beams=2, num_attn_candidates=2, layer=_last_self_layer(b)),
    }


def _last_self_layer(b: _Built) -> int:
    kinds = b.kinds()
    full = [l for l, k in enumerate(kinds) if k == "self" and not b.adapter.is_sliding_layer(b.model, l)]
    return max(full or [len(kinds) - 1])


def _heads(b: _Built, groups):
    ok, refused = _layers_with(b, groups)
    layers = ok or refused  # all refused: let the intervention say why
    return [(l, h) for l in layers for h in range(b.spec.n_heads)]


@pytest.mark.capability("{method}")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(_interventions()))
def test_intervention_one_step_runs_or_refuses(family, method, cell):
    from lens_halluc.generation.decoding import decode

    b = built(family)
    intervention = _interventions()[method](b)
    pad = b.spec.pad_token_id if b.spec.pad_token_id is not None else 0
    try:
        strategy = intervention.bind(b.vlm)
        sampling = "strategy" if method == "opera" else None  # OPERA is a beam search
        out = decode(b.model, b.encoding, max_new_tokens=2, strategy=strategy, pad_token_id=pad, sampling=sampling)
    except NotDefinedForArchitecture as e:
        assert "defined" in str(e) or "needs" in str(e)
        cell.refused(str(e))
        return
    assert out.sequences.shape[0] == 1 and out.sequences.shape[1] <= 2
    assert text_attn_implementation(b.vlm) == "lens_halluc"  # the session restored what was set


@pytest.mark.parametrize("family", ["gemma3"])
def test_sliding_window_layers_equal_eager(family):
    """A window shorter than the prompt: the sliding layers' masks carry it, for eager and the editable attention alike.

    (Gemma 3's prompt is causal outside the image; PaliGemma 2's whole prompt is one bidirectional prefix,
    which the window does not cut, so it cannot show the window.)"""
    b = built(family)
    text = b.adapter.text_config(b.model.config)
    if not any(b.adapter.is_sliding_layer(b.model, l) for l in range(b.spec.n_layers)):
        pytest.skip(f"{family}'s tiny model has no sliding-window layer")
    old = text.sliding_window
    try:
        text.sliding_window = 3
        eager_small, weights = b.eager()
        text.sliding_window = 10_000
        eager_large, _ = b.eager()
        assert (eager_small - eager_large).abs().max() > 1e-4  # the window matters here
        text.sliding_window = 3
        use_editable_attention(b.vlm)
        assert (b.logits() - eager_small).abs().max() <= TOL
        layer = next(l for l in range(b.spec.n_layers) if b.adapter.is_sliding_layer(b.model, l))
        got = capture_attention(b.vlm, b.inputs, layers=[layer])[0]
        assert torch.equal(got, weights[layer])
    finally:
        text.sliding_window = old
