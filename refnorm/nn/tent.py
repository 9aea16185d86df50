r"""TENT: test-time adaptation of the norm layers' affine parameters by entropy minimization.

Wang, Shelhamer, Liu, Olshausen, Darrell, *Tent: Fully Test-Time Adaptation by Entropy
Minimization*, ICLR 2021, arXiv:2006.10726 (official code: DequanWang/tent, ``tent.py``).

On an unlabeled test batch :math:`x` the model predicts :math:`p_i = \mathrm{softmax}(z_i)` and
TENT takes optimizer steps on the mean prediction entropy

.. math::

    L = \frac1B\sum_i H_i,\qquad H_i = -\sum_k p_{ik}\log p_{ik},\qquad
    \frac{\partial H_i}{\partial z_i} = -p_i\odot(\log p_i + H_i),

with respect to the affine parameters of the norm layers only (every other parameter frozen),
while the stateful norms (BatchNorm) normalize with the **test batch's statistics**. As in the
official ``forward_and_adapt``, each step returns the predictions of its forward, made before that
step's update; adaptation is online (it carries over from batch to batch) until :meth:`Tent.reset`.

Conventions (the official code's, where it has one):

* the official code adapts BatchNorm layers only; CEMA (Chen et al.) also GroupNorm and LayerNorm.
  Here ``variants`` chooses (default: every :class:`~refnorm.nn.Norm` layer with parameters);
* the official code drops the running statistics (``track_running_stats=False``). Here the
  adapted norm layers run in training mode (batch statistics) with their state frozen
  (:attr:`Norm.freeze_state`), so the source statistics are kept and :meth:`Tent.reset` restores
  the source model exactly; the rest of the model is in evaluation mode;
* the optimizer is the configuration's (the official CIFAR configuration: Adam, ``lr=1e-3``);
  frozen parameters get ``requires_grad=False``, as the official ``configure_model`` does.
"""
from __future__ import annotations

from refnorm.nn.layers import Norm, check_positive_int, entropy
from refnorm.nn.module import Optimizer


class Tent:
    """Wrap ``model`` for test-time adaptation; ``tent(x)`` adapts on ``x`` and returns logits.

    Parameters
    ----------
    model : Module
        A classifier returning logits (last axis: classes). It is modified: its norm layers'
        parameters are updated in place of the old arrays (``reset`` restores them).
    optimizer : str
        A name in ``refnorm.optim.BY_NAME`` (default ``"adam"``).
    steps : int
        Optimizer steps per call (the official default: 1).
    variants : sequence of str, optional
        Adapt only the norm layers of these variants (``("batch_norm",)`` is the original
        TENT); default: every norm layer with parameters.
    **hyper
        The optimizer's hyper-parameters (default ``lr=1e-3``).
    """

    def __init__(self, model, *, optimizer="adam", steps=1, variants=None, **hyper):
        self.model, self.steps = model, check_positive_int(steps, "steps", "Tent")
        self.norms = [m for m in model.modules() if isinstance(m, Norm) and m.parameters()
                      and (variants is None or m.spec.name in variants)]
        if not self.norms:
            raise ValueError("Tent: the model has no norm layer with affine parameters to adapt"
                             + (f" among the variants {tuple(variants)}" if variants else ""))
        self.params = [p for m in self.norms for p in m.parameters()]
        self.source = model.state_dict()
        self._optimizer_name, self._hyper = optimizer, dict({"lr": 1e-3}, **hyper)
        self._configure()

    def _configure(self):
        adapted = {id(p) for p in self.params}
        for p in self.model.parameters():
            p.requires_grad = id(p) in adapted
            p.grad = None
        self.model.eval()
        for m in self.norms:
            m.train()
            m.freeze_state = True
        self.optimizer = Optimizer(self.params, self._optimizer_name, **self._hyper)

    def __call__(self, x):
        for _ in range(self.steps):
            logits = self.model(x)
            loss = entropy(logits)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return logits

    def reset(self):
        """Back to the source model's parameters, and a fresh optimizer state."""
        self.model.load_state_dict(self.source)
        self._configure()

    def release(self):
        """Undo the configuration: every parameter trainable again, norm state unfrozen, the
        model in evaluation mode (the adapted parameters are kept)."""
        for p in self.model.parameters():
            p.requires_grad = True
        for m in self.norms:
            m.freeze_state = False
        self.model.eval()
        return self.model
