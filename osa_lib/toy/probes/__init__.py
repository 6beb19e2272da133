"""Probes of the trained toy model, each a module with a command line (``python -m osa_lib.toy.probes.NAME``):

- ``evaluate``: drawing and mask quality on held-out prompts (``results/toy_model_quality.md``);
- ``binding``: whether each word's cross-attention falls on its own character;
- ``appearance``: whether appearance travels through self-attention from a reference
  (``results/toy_appearance_probe.md``).
"""
