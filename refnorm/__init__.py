"""refnorm: a pure-NumPy reference for neural-network normalization.

The public names:

* :mod:`refnorm.autograd`: a small reverse-mode autodiff engine (``Tensor``, ``grad``,
  ``no_grad``, ``custom_vjp``);
* :mod:`refnorm.gradcheck`: finite-difference checking of any callable on NumPy arrays;
* :mod:`refnorm.registry`: the record types that drive the tests, the CLI and the docs;
* :mod:`refnorm.norms`: every normalization variant, one record each;
* :mod:`refnorm.optim`: optimizers for normalized networks;
* :mod:`refnorm.nn`: models on the engine (Module, Parameter, the generic ``Norm`` layer of any
  registered variant, Transformers with norm placement, conv nets, TENT).
"""

__version__ = "0.1.0"
