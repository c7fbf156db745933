"""Thin integrations with training frameworks, each an optional extra.

* :mod:`taskbalance.integrations.lightning` — :class:`TaskBalancingMixin` for a ``LightningModule``
  with manual optimisation (``pip install taskbalance[lightning]``);
* :mod:`taskbalance.integrations.huggingface` — :class:`BalancedTrainer`, a ``transformers.Trainer`` whose
  training step balances per-task losses (``pip install taskbalance[hf]``).

Import the submodule you need; this package imports neither framework.
"""

__all__: list[str] = []
