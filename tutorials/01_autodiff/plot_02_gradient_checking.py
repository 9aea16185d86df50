r"""
Gradient checking
=================

A hand-derived backward is a claim; finite differences are the evidence. This tutorial measures
what a finite-difference check can and cannot see:

* the **V-shaped** curve of error against step size, and where its bottom lies;
* **Richardson extrapolation**, which reaches nearly full precision at a large step;
* the **fast mode** of :func:`refnorm.gradcheck.check_vjp`: random projections
  :math:`u^T J v`, a few evaluations whatever the input's size;
* **kinks** (ReLU at 0, ties in a max), where no derivative exists and a checker must say so
  rather than fail.
"""
import matplotlib.pyplot as plt
import numpy as np

from refnorm.gradcheck import check_vjp, directional_derivative
from refnorm.norms.layer_norm import layer_norm_backward, layer_norm_forward

# %%
# The V-shaped curve
# ------------------
#
# Take :math:`f(x) = e^{\sin x}\,x` at :math:`x_0 = 0.8`, whose derivative
# :math:`f'(x) = e^{\sin x}(1 + x\cos x)` we know exactly. The forward difference
# :math:`(f(x+h) - f(x))/h` has a truncation error :math:`\tfrac{h}{2}|f''|`; the central
# difference :math:`(f(x+h) - f(x-h))/2h` one of :math:`\tfrac{h^2}{6}|f'''|`. Both also divide
# the rounding error of :math:`f`, about :math:`u|f|` with :math:`u = 2^{-53}`, by :math:`h`.
# The sum is a V on a log-log plot, with its bottom where the two meet:
# :math:`h \approx \sqrt{u}\approx 10^{-8}` (forward) and :math:`h \approx u^{1/3} \approx
# 10^{-5}` (central).


def f(x):
    return np.exp(np.sin(x)) * x


def df(x):
    return np.exp(np.sin(x)) * (1 + x * np.cos(x))


x0 = 0.8
steps = np.logspace(-14, -1, 66)
forward = np.abs((f(x0 + steps) - f(x0)) / steps - df(x0))
central = np.abs((f(x0 + steps) - f(x0 - steps)) / (2 * steps) - df(x0))
best_fwd, best_cen = steps[np.argmin(forward)], steps[np.argmin(central)]
print(f"forward difference: best step {best_fwd:.1e}, error {forward.min():.1e}")
print(f"central difference: best step {best_cen:.1e}, error {central.min():.1e}")

# %%
# Richardson extrapolation
# ------------------------
#
# The central difference has an error series in **even** powers of the step,
# :math:`D(h) = f'(x) + c_2 h^2 + c_4 h^4 + \dots`, so
# :math:`(4D(h/2) - D(h))/3` cancels the :math:`h^2` term, and repeating cancels :math:`h^4`,
# :math:`h^6`... The plainest version, four levels:


def richardson(fun, x, h, levels=4):
    table = [[(fun(x + h / 2**i) - fun(x - h / 2**i)) / (2 * h / 2**i)] for i in range(levels)]
    for i in range(1, levels):
        for k in range(1, i + 1):
            table[i].append(table[i][k - 1] + (table[i][k - 1] - table[i - 1][k - 1]) / (4**k - 1))
    return table[-1][-1]


rich = np.abs(np.array([richardson(f, x0, h) for h in steps]) - df(x0))
print(f"Richardson (4 levels): best step {steps[np.argmin(rich)]:.1e}, error {rich.min():.1e}; "
      f"at h = 1e-2 the error is {abs(richardson(f, x0, 1e-2) - df(x0)):.1e}")

fig, ax = plt.subplots(figsize=(6.4, 4.0))
ax.loglog(steps, forward, label="forward difference")
ax.loglog(steps, central, label="central difference")
ax.loglog(steps, rich, label="central + Richardson, 4 levels")
ax.loglog(steps, np.finfo(float).eps * abs(f(x0)) / steps, "k:", lw=1,
          label=r"rounding: $u|f|/h$")
ax.set_xlabel("step h")
ax.set_ylabel("|error of the derivative|")
ax.set_ylim(1e-17, 1)
ax.legend(fontsize=8)
ax.set_title("Error against step: truncation on the right, rounding on the left")
fig.tight_layout()

# %%
# Richardson's table also tells how far its entries moved, which is an **error estimate**
# that costs nothing more. :func:`refnorm.gradcheck.directional_derivative` returns that
# estimate with the derivative (steps :math:`t, t/2, t/4, t/8`, the largest relative to the
# input's magnitude), so a checker knows how much disagreement to forgive:

value, estimate, kink = directional_derivative(lambda x: f(x), [np.array([x0])],
                                               [np.array([1.0])])
print(f"refnorm: f'(x0) = {value[0]:.16f}  estimated error {estimate[0]:.1e}, "
      f"true error {abs(value[0] - df(x0)):.1e}")

# %%
# Checking a vector-Jacobian product
# ----------------------------------
#
# A backward computes :math:`J^T u`: the upstream gradient :math:`u` (``dy``) pulled back
# through the Jacobian. The plainest check builds :math:`J` column by column, two evaluations
# of the forward per input element, here for LayerNorm's backward on 5 rows of 8:

rng = np.random.default_rng(2026)
x = rng.standard_normal((5, 8))
dy = rng.standard_normal((5, 8))  # random: never all ones (see the BatchNorm tutorial)


def ln(x):
    return layer_norm_forward(x, 8)[0]


h = 1e-5
J = np.empty((x.size, x.size))
for j in range(x.size):
    e = np.zeros(x.size)
    e[j] = h
    J[:, j] = (ln(x + e.reshape(x.shape)) - ln(x - e.reshape(x.shape))).ravel() / (2 * h)
dx_numerical = (J.T @ dy.ravel()).reshape(x.shape)
dx = layer_norm_backward(dy, layer_norm_forward(x, 8)[1]).dx
print(f"full Jacobian ({2 * x.size} evaluations): max |dx - J^T dy| = "
      f"{np.max(np.abs(dx - dx_numerical)):.1e}")

# %%
# This costs :math:`2n` evaluations for :math:`n` inputs, and its accuracy is that of one central
# difference, about :math:`10^{-10}`. refnorm's **fast mode** checks a random projection
# instead: for a random direction :math:`v`,
#
# .. math::
#     u^T (J v) = (J^T u)^T v ,
#
# the left side is **one** directional derivative of the forward (6 evaluations: central
# differences at three steps, with Richardson), the right side one backward call dotted with
# :math:`v`. With the evaluation at :math:`x` itself that makes 7, whatever :math:`n`. A wrong
# backward passes a random projection only by a measure-zero accident. Slow mode spends 4
# evaluations per element (two steps), and the full Richardson table only on the elements that
# this does not decide. Counting the evaluations of both modes:


def ln_vjp(cts, x):
    return (layer_norm_backward(cts[0], layer_norm_forward(x, x.shape[-1])[1]).dx,)


sizes = [4, 8, 16, 32, 64]
evals = {"slow": [], "fast": []}
for n in sizes:
    xn = rng.standard_normal((4, n))
    for mode in evals:
        report = check_vjp(lambda x: layer_norm_forward(x, x.shape[-1])[0], ln_vjp, [xn],
                           mode=mode)
        assert report, report
        evals[mode].append(report.n_evals)
print("evaluations of the forward, slow mode:", evals["slow"])
print("evaluations of the forward, fast mode:", evals["fast"])

# %%
# Now a **wrong** backward: the classic slip of dropping the term that comes through the
# variance, :math:`\mathrm{d}x = r(\mathrm{d}y - \langle\mathrm{d}y\rangle)` instead of
# :math:`r(\mathrm{d}y - \langle\mathrm{d}y\rangle - \hat x\langle\mathrm{d}y\,\hat x\rangle)`.
# The fast check fails, then narrows the failure down to elements and reports the worst one:


def wrong_vjp(cts, x):
    r = 1 / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    g = cts[0]
    return (r * (g - g.mean(-1, keepdims=True)),)


report = check_vjp(ln, wrong_vjp, [x])
print(report)

# %%
# Kinks
# -----
#
# ReLU has no derivative at 0, and :math:`\max` none where two entries tie. At such a point the
# two one-sided slopes differ; a central difference returns their average, which matches no
# backward. refnorm's checker extrapolates both one-sided slopes too, and where they are each
# well determined and disagree it reports a **kink**: a backward that returns either slope (or
# anything between) is not a failure there. Here ReLU gets an exact zero among its inputs, and
# the backward uses the convention :math:`\mathrm{relu}'(0) = 0`. (The slopes printed are
# those of :math:`u^T f` for the checker's random cotangent :math:`u`: 0 on the left,
# :math:`u_2` on the right.)

xr = rng.standard_normal(6)
xr[2] = 0.0
report = check_vjp(lambda x: np.maximum(x, 0.0), lambda cts, x: (cts[0] * (x > 0),), [xr])
print(report)

# %%
# The one-sided slopes along the kinked element, against the step: the forward slope is 1 and
# the backward one 0 at every step, and the central difference sits at 1/2, which is neither.

hs = np.logspace(-8, -1, 30)
relu = lambda x: np.maximum(x, 0.0)  # noqa: E731
right = (relu(0.0 + hs) - relu(0.0)) / hs
left = (relu(0.0) - relu(0.0 - hs)) / hs
centred = (relu(0.0 + hs) - relu(0.0 - hs)) / (2 * hs)

fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4))
axes[0].loglog(sizes, evals["slow"], "o-", label="slow: every element")
axes[0].loglog(sizes, evals["fast"], "s-", label="fast: 3 random projections")
axes[0].set_xlabel("row length n (4 rows)")
axes[0].set_ylabel("evaluations of the forward")
axes[0].legend(fontsize=8)
axes[0].set_title("Cost of a check")
axes[1].semilogx(hs, right, label="forward slope")
axes[1].semilogx(hs, left, label="backward slope")
axes[1].semilogx(hs, centred, "--", label="central difference")
axes[1].set_xlabel("step h")
axes[1].set_ylim(-0.1, 1.1)
axes[1].legend(fontsize=8)
axes[1].set_title("ReLU at 0: a kink")
fig.tight_layout()
plt.show()

# %%
# For a normalization layer, the next tutorial shows one more trap: an upstream gradient of
# all ones, which makes the check of a BatchNorm backward vacuous. The how-to
# :doc:`/howto/gradcheck` checks another library's gradients with these tools, and the API of
# :func:`refnorm.gradcheck.check_vjp` lists every option.
