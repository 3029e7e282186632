"""Re-training against hallucination: targeted head fine-tuning (TFHH), SEED-style distillation, Causal-LLaVA's module.

One shared piece per concern: :mod:`.data` (examples → teacher-forced batches), :mod:`.loop`
(optimiser, progress, timing, checkpoints), one module per method. Every method returns a
:class:`~lens_halluc.training.loop.TrainResult` and saves a checkpoint that
:func:`lens_halluc.models.load_vlm` loads (the causal module is re-attached automatically).

Example
-------
>>> from lens_halluc.models import load_vlm
>>> from lens_halluc.training import TFHHConfig, organism_examples, train_tfhh
>>> vlm = load_vlm()                                                            # doctest: +SKIP
>>> res = train_tfhh(vlm, organism_examples(vlm.path, 2000), heads=[(0, 0), (1, 7)],
...                  config=TFHHConfig(steps=200))                             # doctest: +SKIP
>>> res.save(vlm, "runs/retrain/tfhh")                                          # doctest: +SKIP
"""
from .causal import CausalConfig, ConfounderAttention, attach_causal_module, build_confounder_dictionary, train_causal
from .data import IGNORE, TrainExample, coco_caption_examples, collate, organism_examples
from .distill import DistillConfig, train_seed_distillation
from .loop import TrainResult, load_training_info
from .tfhh import TFHHConfig, TextAttentionRecorder, tfhh_parameters, train_tfhh

__all__ = [
    "IGNORE", "CausalConfig", "ConfounderAttention", "DistillConfig", "TFHHConfig", "TextAttentionRecorder",
    "TrainExample", "TrainResult", "attach_causal_module", "build_confounder_dictionary", "coco_caption_examples",
    "collate", "load_training_info", "organism_examples", "tfhh_parameters", "train_causal",
    "train_seed_distillation", "train_tfhh",
]
