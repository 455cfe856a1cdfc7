"""The embedded world: a miniature of the paper's situation that runs offline on CPU in minutes.

* :mod:`drsft.toy.world` -- the synthetic math families, expert and model-style solutions, the
  pretraining corpus and drills (``prepare.source: toy``);
* :mod:`drsft.toy.tinylm` -- the tiny Llama pretrained on that corpus (``model.base: toy``);
* :mod:`drsft.toy.probe` -- the world's properties measured on the base model (the ``probe`` stage).
"""
