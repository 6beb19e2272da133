"""The toy backbone: a small text-to-image model trained on a procedurally generated world.

Three roles, each importing only from the ones before it:

- **the world** (ground truth): ``world`` (scenes, captions, the grammar), ``analyzer`` (reads a
  drawn image back into characters), ``metrics`` (the toy story metrics built on the analyzer),
  ``flipbook`` (the same for a flip-book's frames, ``osa_lib.video``);
- **the model**: ``model`` (``ToyPipeline``), ``reference`` (reference self-attention for
  training), ``drawn_pool`` (the model's own drawings as references), ``train`` (the training
  loop), ``delta`` (a fine-tune stored as the tensors it changed, and the shipped backbone);
- **the probes** (``toy.probes``): measurements of the trained model that run the method's
  code (``evaluate``, ``binding``, ``appearance``), each with its command line.

The world and the model import nothing above ``osa_lib.config`` and ``osa_lib.layers``; the
probes may import anything.
"""
