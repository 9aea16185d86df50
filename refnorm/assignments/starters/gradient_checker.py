r"""Assignment 6: a gradient checker.

STARTER

Every hand-derived backward should be checked against finite differences. Fill in the two
functions below with NumPy. Then run ``python gradient_checker.py`` for a quick self-check,
and ``refnorm grade gradient_checker gradient_checker.py`` for the grade (it runs your
checker on functions whose Jacobians are known exactly).

Central differences
-------------------
For :math:`f: \mathbb{R}^n \to \mathbb{R}^m` (``x`` and ``f(x)`` arrays of any shape,
flattened in C order), column :math:`j` of the Jacobian is

.. math::

    J_{:, j} \approx \frac{f(x + h e_j) - f(x - h e_j)}{2h}

with error :math:`\frac{h^2}{6} f'''` from truncation plus about :math:`\varepsilon |f| / h`
from rounding (:math:`\varepsilon = 2.2\times10^{-16}` in float64): a one-sided difference
:math:`(f(x+he_j) - f(x))/h` has error :math:`\frac h2 f''`, far larger. Use the step ``h``
you are given (the grader checks that you do), perturb a **copy** of ``x`` (or restore it:
the caller's ``x`` must be unchanged), and return a float64 array of shape
``(f(x).size, x.size)``.

``gradcheck(f, x, jacobian, h, rtol, atol)`` compares a claimed Jacobian with yours and
returns ``True`` when every entry satisfies
:math:`|J_{num} - J| \le \text{atol} + \text{rtol}\, |J_{num}|` (``False`` too when the shapes
differ).
"""
import numpy as np


def numerical_jacobian(f, x, h=1e-6):
    """The Jacobian of ``f`` at ``x`` by central differences with step ``h``."""
    raise NotImplementedError("your code here")


def gradcheck(f, x, jacobian, h=1e-6, rtol=1e-4, atol=1e-6):
    """Whether ``jacobian`` agrees with the numerical Jacobian of ``f`` at ``x``."""
    raise NotImplementedError("your code here")


def _self_check():
    a = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    x = np.array([0.5, -1.5])
    print("linear map, J = A:", np.allclose(numerical_jacobian(lambda v: a @ v, x), a))
    x = np.array([0.3, -0.7, 1.1])
    jac = numerical_jacobian(np.sin, x, h=1e-5)
    print("sin, J = diag(cos x): max error", np.abs(jac - np.diag(np.cos(x))).max(),
          "(expect about 1e-11)")
    print("x unchanged:", np.array_equal(x, np.array([0.3, -0.7, 1.1])))
    print("gradcheck accepts the right Jacobian:",
          gradcheck(np.sin, x, np.diag(np.cos(x))), "and rejects a wrong one:",
          not gradcheck(np.sin, x, np.diag(np.sin(x))))


if __name__ == "__main__":
    _self_check()
