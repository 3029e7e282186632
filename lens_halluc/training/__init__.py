"""Re-training against hallucination (``lh.train``): TFHH, SEED-style distillation, Causal-LLaVA's module.

Three calls, each with ``flavour="reference"`` (the paper's code, the default) or ``"corrected"``
(our variant; the differences are listed in each method's module and in FIDELITY.md), each training the model in place and returning a :class:`Retrained` (the model and
its record: config, seconds, trained parameters, ``losses`` DataFrame, separability when a
confounder export is given) whose ``.save(dir)`` writes a checkpoint
:func:`lens_halluc.models.load_vlm` loads (the causal module is re-attached automatically):

- :func:`tfhh` ``(vlm, heads, examples, **options)``
- :func:`seed_distill` ``(vlm, examples, **options)``
- :func:`causal_module` ``(vlm, examples, confounders, **options)``

One shared piece per concern underneath: :mod:`.data` (examples → teacher-forced batches),
:mod:`.loop` (the one training loop, its record, checkpoints), one module per method.
Examples of the organism's world come from ``lens_halluc.organism.examples.training_examples``
(the organism is a layer above).

Example
-------
>>> import lens_halluc as lh
>>> from lens_halluc.organism.examples import training_examples
>>> vlm = lh.load_vlm()                                                        # doctest: +SKIP
>>> res = lh.train.tfhh(vlm, [(0, 0), (1, 7)], training_examples(vlm.path, 2000), steps=200)  # doctest: +SKIP
>>> res.save("runs/retrain/tfhh")                                              # doctest: +SKIP
"""
from ._tfhh import FLAVOURS_TFHH, TFHHConfig, TextAttentionRecorder, tfhh_parameters
from .api import Retrained, causal_module, seed_distill, tfhh
from .causal import (FLAVOURS_CAUSAL, CausalConfig, CausalIntervention, ConfounderAttention, attach_causal_module,
                     build_confounder_dictionaries, build_confounder_dictionary)
from .data import IGNORE, TrainExample, coco_caption_examples, collate
from .distill import FLAVOURS_DISTILL, DistillConfig
from .loop import TrainResult, load_training_info, run_training
from .separability import separability_summary

__all__ = [
    "FLAVOURS_CAUSAL", "FLAVOURS_DISTILL", "FLAVOURS_TFHH", "IGNORE", "CausalConfig", "CausalIntervention",
    "ConfounderAttention", "DistillConfig", "Retrained", "TFHHConfig", "TextAttentionRecorder", "TrainExample",
    "TrainResult", "attach_causal_module", "build_confounder_dictionaries", "build_confounder_dictionary",
    "causal_module", "coco_caption_examples", "collate", "load_training_info", "run_training", "seed_distill",
    "separability_summary", "tfhh", "tfhh_parameters",
]
