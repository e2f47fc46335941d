"""qsmnet.transforms.solvers: conjugate gradients against a dense direct solve (numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qsmnet.transforms.solvers import conjugate_gradient


def _spd_system(n=12, cond=50.0, seed=0):
    """A symmetric positive definite matrix with eigenvalues in [1, cond] and a right-hand side."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = q @ np.diag(np.geomspace(1.0, cond, n)) @ q.T
    return a, rng.standard_normal(n)


def test_solves_an_spd_system_to_the_tolerance():
    a, b = _spd_system()
    at = torch.tensor(a)
    x, iterations, rel = conjugate_gradient(lambda v: at @ v, torch.tensor(b), max_iter=200, tol=1e-10)
    truth = np.linalg.solve(a, b)
    # the residual reported is the true one, and it is below the tolerance
    true_rel = np.linalg.norm(b - a @ x.numpy()) / np.linalg.norm(b)
    assert rel <= 1e-10 and true_rel == pytest.approx(rel, rel=1e-3, abs=1e-14)
    # error <= cond(A) * relative residual
    assert np.linalg.norm(x.numpy() - truth) / np.linalg.norm(truth) <= 50.0 * 1e-10
    # exact arithmetic converges in n steps; in float64 a few more at most for cond 50
    assert iterations <= 12 + 4


def test_operator_on_volumes_and_a_warm_start():
    """CG on a 3-D tensor with a diagonal operator: one step per distinct diagonal value."""
    g = torch.Generator().manual_seed(1)
    diag = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)[torch.randint(0, 3, (4, 5, 6), generator=g)]
    b = torch.randn(4, 5, 6, dtype=torch.float64, generator=g)
    x, iterations, rel = conjugate_gradient(lambda v: diag * v, b, max_iter=10, tol=1e-12)
    assert iterations == 3  # the Krylov space of a matrix with 3 eigenvalues has dimension 3
    torch.testing.assert_close(x, b / diag, rtol=1e-12, atol=0)
    # from the solution itself: nothing left to do after one step
    x2, it2, rel2 = conjugate_gradient(lambda v: diag * v, b, x0=b / diag, max_iter=10, tol=1e-12)
    assert it2 == 1 and rel2 < 1e-12
    torch.testing.assert_close(x2, b / diag, rtol=1e-12, atol=0)
    # an arbitrary start reaches the same solution and is not modified in place
    start = torch.ones_like(b)
    x3, _, _ = conjugate_gradient(lambda v: diag * v, b, x0=start, max_iter=10, tol=1e-12)
    torch.testing.assert_close(x3, b / diag, rtol=1e-12, atol=0)
    assert torch.equal(start, torch.ones_like(b))


def test_zero_rhs_max_iter_and_semidefinite_breakdown():
    a, b = _spd_system(cond=1e6)
    at = torch.tensor(a)
    x, iterations, rel = conjugate_gradient(lambda v: at @ v, torch.zeros(12, dtype=torch.float64))
    assert iterations == 0 and rel == 0.0 and torch.equal(x, torch.zeros(12, dtype=torch.float64))
    x, iterations, rel = conjugate_gradient(lambda v: at @ v, torch.tensor(b), max_iter=2, tol=0.0)
    assert iterations == 2
    assert rel == pytest.approx(np.linalg.norm(b - a @ x.numpy()) / np.linalg.norm(b), rel=1e-6)
    # a null-space direction (p^T A p = 0) stops the iteration instead of dividing by zero
    x, iterations, rel = conjugate_gradient(lambda v: 0 * v, torch.ones(5, dtype=torch.float64))
    assert iterations == 1 and torch.equal(x, torch.zeros(5, dtype=torch.float64))
    assert math.isclose(rel, 1.0)
