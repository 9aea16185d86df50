"""Example candidates for the oracle: kernels written the way a kernel author would, checked
by ``refnorm compare`` and by the test suite.

* :mod:`refnorm.oracle.examples.triton_layer_norm`: a Triton LayerNorm (forward and backward)
  and its wrong twin (eps outside the square root); needs ``triton`` and ``torch``, and runs
  on the CPU under ``TRITON_INTERPRET=1`` (``docs/howto/triton.rst``).

Nothing here is imported by ``refnorm`` itself: the optional packages are needed only by the
module that is used.
"""
