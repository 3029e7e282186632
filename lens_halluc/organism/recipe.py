"""The organism's training recipe, following LLaVA's stages.

0. **base** — a Llama causal LM trained on the world's captions alone (the language prior; the
   base model of the inheritance analysis).
1. **vision** — a CLIP-style ViT pretrained to name the object drawn in each patch (stand-in for
   CLIP pretraining).
2. **projector** — LLaVA with the stage-1 tower and the stage-0 LM; only the projector trains,
   on captions (the "initial model" of the drift analysis).
3. **final** — projector + LM train on captions and yes/no questions; ``n_checkpoints`` snapshots
   along the way (drift), the last one is the final model.

Every stage is saved with ``save_pretrained`` (safetensors, with tokenizer / processor), so it
loads through :func:`lens_halluc.models.load_vlm` like ``llava-hf/llava-1.5-7b-hf``.

Example
-------
>>> train_organism("runs/organism", RecipeConfig(seed=0))        # doctest: +SKIP
>>> train_organism("runs/quick", RecipeConfig.quick())           # a few steps, for tests  # doctest: +SKIP
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..models.batching import IGNORE, right_padded_batch
from ..models.prompts import CAPTION_PROMPT, get_template
from ..models.tiny import build_processor, tiny_llava_config
from ..models.wordlevel import IMAGE_TOKEN, build_word_tokenizer
from ..training.loop import run_training
from .world import World, WorldConfig


@dataclass(frozen=True)
class RecipeConfig:
    """Sizes, data and schedule of the recipe. Defaults train the shipped organism (~10 min, 2 CPU cores)."""

    # The shipped organism's world; ORGANISM.md reports the variants tried (partner_position="end", ...).
    world: WorldConfig = field(default_factory=WorldConfig)
    world_seed: int = 0
    seed: int = 0
    # text tower (Llama)
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 8
    hidden_size: int = 128
    intermediate_size: int = 256
    # vision tower (CLIP ViT)
    vision_hidden: int = 96
    vision_layers: int = 2
    vision_heads: int = 4
    # data and schedule
    n_scenes: int = 8000
    batch_size: int = 32
    base_steps: int = 1500
    vision_steps: int = 400
    projector_steps: int = 500
    tune_steps: int = 3000
    n_checkpoints: int = 5
    question_fraction: float = 0.5
    lr_base: float = 2e-3
    lr_vision: float = 2e-3
    lr_projector: float = 2e-3
    lr_tune: float = 1e-3
    weight_decay: float = 0.01
    template: str = "llava-1.5"

    @classmethod
    def quick(cls, **overrides) -> "RecipeConfig":
        """A few steps of every stage on a small model: for tests and smoke runs (seconds)."""
        base = dict(n_layers=2, n_heads=4, n_kv_heads=4, hidden_size=32, intermediate_size=64, vision_hidden=32,
                    vision_layers=1, vision_heads=2, n_scenes=64, batch_size=8, base_steps=3, vision_steps=3,
                    projector_steps=3, tune_steps=5, n_checkpoints=5)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["world"] = self.world.to_dict()
        return d


# ---------------------------------------------------------------------------- data
class OrganismData:
    """Pre-rendered training scenes as tensors, plus the token sequences the recipe trains on.

    ``pixels``: float ``[n, 3, S, S]`` normalised like the processor ((x/255 - 0.5) / 0.5);
    ``patch_labels``: long ``[n, (S/P)^2]`` category index + 1 of the glyph drawn in each patch
    (0 = background; hidden objects are not drawn, so their patch is background).
    """

    def __init__(self, world: World, tokenizer, n: int, seed: int, template: str):
        from .export import sample_split

        self.world, self.tokenizer = world, tokenizer
        self.template = get_template(template)
        self.scenes = sample_split(world, "normal", n, seed)
        arrays = np.stack([world.render_array(s) for s in self.scenes])
        self.pixels = (torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
        g = world.grid
        self.index = {name: i + 1 for i, name in enumerate(world.names)}
        labels = torch.zeros(n, g * g, dtype=torch.long)
        for k, s in enumerate(self.scenes):
            for o in s.objects:
                if o.drawn:
                    labels[k, o.cell[0] * g + o.cell[1]] = self.index[o.name]
        self.patch_labels = labels
        self.n_image_tokens = g * g
        rng = np.random.default_rng(seed + 1)
        self.questions = [world.questions(s, rng) for s in self.scenes]
        self.eos = tokenizer.eos_token_id

    def _ids(self, text: str, bos: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=bos).input_ids

    def prompt_ids(self, prompt: str, with_image: bool = True) -> list[int]:
        """Token ids of the templated prompt; the image token expanded to one per patch (as the processor does)."""
        if with_image:
            text = self.template.format(prompt).replace(IMAGE_TOKEN, IMAGE_TOKEN * self.n_image_tokens)
        else:
            text = self.template.format_text_only(prompt)
        return self._ids(text, bos=True)

    def example(self, k: int, kind: str, rng: np.random.Generator, with_image: bool = True) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of scene ``k``: a caption (``kind="caption"``) or a random yes/no question."""
        if kind == "caption":
            prompt, answer = CAPTION_PROMPT, self.world.caption(self.scenes[k])
        else:
            q = self.questions[k][int(rng.integers(len(self.questions[k])))]
            prompt, answer = q.text, q.answer
        p = self.prompt_ids(prompt, with_image)
        a = self._ids(answer, bos=False) + [self.eos]
        return p + a, [IGNORE] * len(p) + a

    def batch(self, idx: np.ndarray, rng: np.random.Generator, question_fraction: float = 0.0,
              with_image: bool = True) -> dict[str, torch.Tensor]:
        """A right-padded training batch for scenes ``idx``."""
        seqs = [self.example(int(k), "question" if rng.random() < question_fraction else "caption", rng, with_image)
                for k in idx]
        out = right_padded_batch([x for x, _ in seqs], self.tokenizer.pad_token_id, [y for _, y in seqs])
        if with_image:
            out["pixel_values"] = self.pixels[torch.as_tensor(idx)]
        return out


def _batches(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    for _ in range(steps):
        yield rng.choice(n, size=batch_size, replace=False)


# ---------------------------------------------------------------------------- stages
def _build(cfg: RecipeConfig, tokenizer):
    from transformers import LlavaForConditionalGeneration

    w = cfg.world
    config = tiny_llava_config(
        vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, vision_hidden=cfg.vision_hidden, vision_layers=cfg.vision_layers,
        vision_heads=cfg.vision_heads, image_size=w.image_size, patch_size=w.patch_size, max_positions=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    # The ViT's last layer feeds the projector: the layer stage 1 trains.
    config.vision_feature_layer = -1
    config.text_config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def train_organism(out_dir: str | Path, cfg: RecipeConfig | None = None, progress: bool = True) -> dict:
    """Run all stages and save them under ``out_dir``; returns a summary dict (also ``recipe.json``).

    Layout: ``base/`` (causal LM + tokenizer), ``vision/`` (ViT), ``projector/`` (stage 2),
    ``checkpoints/checkpoint-K/`` (stage 3, K = 1..n_checkpoints) and ``final/`` (= last checkpoint).
    """
    from transformers import LlamaForCausalLM

    cfg = cfg or RecipeConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    world = World(cfg.world, seed=cfg.world_seed)
    tokenizer = build_word_tokenizer(world.vocabulary())
    processor = build_processor(tokenizer, cfg.world.image_size, cfg.world.patch_size)
    data = OrganismData(world, tokenizer, cfg.n_scenes, cfg.seed, cfg.template)
    model = _build(cfg, tokenizer)
    meta = {"world": cfg.world.to_dict(), "world_seed": cfg.world_seed, "recipe_seed": cfg.seed}
    timings, losses = {}, {}

    # -- stage 0: base language model on captions alone
    t0 = time.time()
    base = LlamaForCausalLM(model.config.text_config)
    base.train()
    it0 = _batches(cfg.n_scenes, cfg.batch_size, cfg.base_steps, rng)
    losses["base"] = run_training("base LM", cfg.base_steps,
                                  lambda s: base(**data.batch(next(it0), rng, with_image=False)).loss,
                                  base.parameters(), cfg.lr_base, cfg.weight_decay, progress=progress).losses
    base.eval()
    base.generation_config.eos_token_id = tokenizer.eos_token_id
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    base.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    (out / "base" / ORGANISM_META).write_text(json.dumps(meta, indent=1))
    timings["base"] = time.time() - t0

    # -- stage 1: vision tower names the glyph in each patch
    t0 = time.time()
    tower = model.model.vision_tower
    head = nn.Linear(cfg.vision_hidden, len(world.names) + 1)
    it1 = _batches(cfg.n_scenes, cfg.batch_size * 2, cfg.vision_steps, rng)

    def vision_step(_):
        idx = torch.as_tensor(next(it1))
        feats = tower(pixel_values=data.pixels[idx]).last_hidden_state[:, 1:]
        return nn.functional.cross_entropy(head(feats).flatten(0, 1), data.patch_labels[idx].flatten())

    tower.train()
    losses["vision"] = run_training("vision", cfg.vision_steps, vision_step,
                                    list(tower.parameters()) + list(head.parameters()), cfg.lr_vision,
                                    cfg.weight_decay, progress=progress).losses
    tower.eval()
    tower.save_pretrained(out / "vision")
    timings["vision"] = time.time() - t0

    # -- stage 2: projector only, on captions
    t0 = time.time()
    model.model.language_model.load_state_dict(base.model.state_dict())
    model.lm_head.load_state_dict(base.lm_head.state_dict())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    model.train()
    it2 = _batches(cfg.n_scenes, cfg.batch_size, cfg.projector_steps, rng)
    losses["projector"] = run_training("projector", cfg.projector_steps, lambda s: model(**data.batch(next(it2), rng)).loss,
                                       model.parameters(), cfg.lr_projector, cfg.weight_decay, progress=progress).losses
    _save_vlm(model, processor, out / "projector", meta)
    timings["projector"] = time.time() - t0

    # -- stage 3: projector + language model on captions and questions, with checkpoints
    t0 = time.time()
    for p in model.model.language_model.parameters():
        p.requires_grad_(True)
    for p in model.lm_head.parameters():
        p.requires_grad_(True)
    model.train()
    it3 = _batches(cfg.n_scenes, cfg.batch_size, cfg.tune_steps, rng)
    save_at = {int(round(cfg.tune_steps * (k + 1) / cfg.n_checkpoints)) - 1: k + 1 for k in range(cfg.n_checkpoints)}

    def snapshot(s):
        if s in save_at:
            _save_vlm(model, processor, out / "checkpoints" / f"checkpoint-{save_at[s]}", meta, train_mode=True)

    losses["tune"] = run_training("instruction tuning", cfg.tune_steps,
                                  lambda s: model(**data.batch(next(it3), rng, cfg.question_fraction)).loss,
                                  model.parameters(), cfg.lr_tune, cfg.weight_decay, progress=progress,
                                  after_step=snapshot).losses
    _save_vlm(model, processor, out / "final", meta)
    timings["tune"] = time.time() - t0

    summary = {
        "config": cfg.to_dict(),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "initial_loss": {k: float(np.mean(v[:5])) if v else None for k, v in losses.items()},
        "final_loss": {k: float(np.mean(v[-5:])) if v else None for k, v in losses.items()},
        "checkpoints": [f"checkpoints/checkpoint-{k}" for k in sorted(save_at.values())],
    }
    (out / "recipe.json").write_text(json.dumps(summary, indent=2))
    return summary


ORGANISM_META = "organism.json"


def _save_vlm(model, processor, path: Path, meta: dict, train_mode: bool = False) -> None:
    """save_pretrained model + processor, plus ``organism.json`` (the world it was trained on)."""
    model.eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (Path(path) / ORGANISM_META).write_text(json.dumps(meta, indent=1))
    if train_mode:
        model.train()


def read_organism_meta(model_dir: str | Path) -> tuple[World, dict]:
    """The world an organism checkpoint was trained on, and its recipe metadata."""
    path = Path(model_dir) / ORGANISM_META
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {model_dir} is not an organism checkpoint saved by the recipe.")
    meta = json.loads(path.read_text())
    return World(WorldConfig.from_dict(meta["world"]), seed=meta["world_seed"]), meta
