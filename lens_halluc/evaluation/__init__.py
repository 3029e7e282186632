"""Evaluation: caption + CHAIR + POPE for a model under a set of interventions (``compare``)."""
