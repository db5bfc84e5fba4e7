"""Potentials: the contract, the algebra, callable and Pyro potentials, the checker."""
import numpy as np
import pytest
import torch

from ppl_scaling.errors import PotentialError
from ppl_scaling.potentials import (
    CallablePotential, Potential, PotentialContractTests, Product, PyroPotential, Tempered,
    check_potential,
)

XS = np.array([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5], [-3.0, 2.0]])


def quad(xs):
    return -0.5 * (np.asarray(xs) ** 2).sum(-1)


def positive_first(xs):  # a constraint: reject particles whose first coordinate is negative
    return np.asarray(xs)[:, 0] >= 0


P = Potential.from_callable(quad, name="quad")
C = Potential.from_callable(positive_first, name="positive_first")


def test_callable_prefix_complete_score():
    q = Potential.from_callable(quad, complete=lambda xs: quad(xs) - 1.0)
    np.testing.assert_allclose(q.prefix(XS), quad(XS))
    fin = np.array([True, False, True, False])
    np.testing.assert_allclose(q.score(XS, fin), np.where(fin, quad(XS) - 1.0, quad(XS)))
    np.testing.assert_allclose(q.score(XS), quad(XS))  # finished defaults to False
    np.testing.assert_allclose(q.score(XS, True), quad(XS) - 1.0)


def test_score_batches_each_method_once():
    calls = []

    def fn(xs):
        calls.append(len(xs))
        return np.zeros(len(xs))

    Potential.from_callable(fn).score(XS, np.array([True, False, False, True]))
    assert calls == [2, 2]


def test_callable_outputs_coerced():
    # lists, torch tensors and booleans (True -> 0, False -> -inf) are all accepted
    lst = Potential.from_callable(lambda xs: [1.0] * len(xs))
    tch = Potential.from_callable(lambda xs: torch.ones(len(xs)))
    np.testing.assert_array_equal(lst.score(XS), np.ones(4))
    np.testing.assert_array_equal(tch.score(XS), np.ones(4))
    np.testing.assert_array_equal(C.score(XS), [0.0, 0.0, 0.0, -np.inf])
    per_item = Potential.from_callable(lambda x: float(x[0, 0]), batched=False)
    np.testing.assert_array_equal(per_item.score(XS), XS[:, 0])
    on_list = Potential.from_callable(len, batched=False)
    np.testing.assert_array_equal(on_list.score(["a", "bcd"]), [1.0, 3.0])


def test_product_and_tempering_identities():
    both = P * C
    assert isinstance(both, Product) and isinstance(both, Potential)
    expect = quad(XS) + np.where(positive_first(XS), 0.0, -np.inf)
    np.testing.assert_array_equal(both.score(XS), expect)
    np.testing.assert_allclose((P ** 2.5).score(XS), 2.5 * quad(XS))
    np.testing.assert_allclose(P.tempered(0.5).score(XS), 0.5 * quad(XS))
    # (p^a)^b = p^(ab), (p q)^a = p^a q^a, p^1 = p, p^0 = indicator of the support
    np.testing.assert_allclose(((P ** 2) ** 3).score(XS), (P ** 6).score(XS))
    assert isinstance((P ** 2) ** 3, Tempered) and (P ** 2 ** 1).base is P
    np.testing.assert_allclose(((P * C) ** 2).score(XS), (P ** 2 * C ** 2).score(XS))
    np.testing.assert_allclose((P ** 1).score(XS), P.score(XS))
    np.testing.assert_array_equal((both ** 0).score(XS), [0, 0, 0, -np.inf])
    # products flatten and stay closed
    triple = P * C * (P ** 2)
    assert len(triple.factors) == 3
    np.testing.assert_allclose(triple.score(XS), 3 * quad(XS) + np.where(positive_first(XS), 0, -np.inf))


def test_product_skips_rejected_particles():
    seen = []

    def expensive(xs):
        seen.append(np.asarray(xs).copy())
        return np.zeros(len(xs))

    (C * Potential.from_callable(expensive)).score(XS)
    np.testing.assert_array_equal(seen[0], XS[:3])


def test_bad_algebra_is_refused():
    with pytest.raises(TypeError, match="from_callable"):
        P * quad
    with pytest.raises(ValueError, match=">= 0"):
        P ** -1.0
    with pytest.raises(ValueError, match="finite"):
        P.tempered(np.inf)


@pytest.mark.parametrize("out, match", [
    (lambda xs: np.zeros((len(xs), 1)), r"shape \(4, 1\).*squeeze"),
    (lambda xs: np.zeros(3), r"shape \(3,\)"),
    (lambda xs: np.array([0.0, np.nan, 0.0, 0.0]), r"NaN for particles \[1\]"),
    (lambda xs: np.array([0.0, 0.0, np.inf, 0.0]), r"\+inf"),
    (lambda xs: np.array(["a"] * len(xs)), "dtype"),
])
def test_output_validation_names_the_potential(out, match):
    p = Potential.from_callable(out, name="broken")
    with pytest.raises(PotentialError, match=match) as e:
        p.score(XS)
    assert "broken.prefix" in str(e.value)


def test_validation_inside_products_names_the_factor():
    nan = Potential.from_callable(lambda xs: np.full(len(xs), np.nan), name="nan_reward")
    with pytest.raises(PotentialError, match="nan_reward"):
        (P * nan).score(XS)


def test_empty_batch():
    assert P.score(np.zeros((0, 2))).shape == (0,)


# --- Pyro ---------------------------------------------------------------------------

def test_pyro_potential_sums_factor_and_observed_sites():
    import pyro
    import pyro.distributions as dist

    y = torch.tensor([0.3, -1.2, 2.0])

    def program(xs):
        x = torch.as_tensor(xs)
        with pyro.plate("particles", x.shape[0], dim=-2):
            with pyro.plate("data", y.shape[0], dim=-1):
                pyro.sample("y", dist.Normal(x[:, :1], 1.0), obs=y)
        pyro.factor("prior", -0.5 * (x ** 2).sum(-1))

    lv = PyroPotential(program).score(XS)
    x0 = XS[:, :1]
    expect = (-0.5 * (y.numpy() - x0) ** 2 - 0.5 * np.log(2 * np.pi)).sum(-1) - 0.5 * (XS ** 2).sum(-1)
    np.testing.assert_allclose(lv, expect, rtol=1e-6)
    assert isinstance(PyroPotential(program) * P, Potential)


def test_pyro_potential_refuses_sampling_and_bad_shapes():
    import pyro
    import pyro.distributions as dist

    def samples(xs):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(PotentialError, match="must not sample"):
        PyroPotential(samples).score(XS)

    def scalar(xs):
        pyro.factor("f", torch.tensor(1.0))

    with pytest.raises(PotentialError, match="leading batch dimension"):
        PyroPotential(scalar).score(XS)


# --- check_potential and the mixin -------------------------------------------------

def test_check_potential_accepts_good_potentials():
    for p in (P, C, P * C, (P * C) ** 0.3):
        check_potential(p, XS)
    check_potential(P, list(XS))


class BatchDependent(Potential):
    def prefix(self, xs):
        xs = np.asarray(xs)
        return xs[:, 0] - xs[:, 0].mean()  # depends on the other particles


class Revives(Potential):
    def prefix(self, xs):
        return np.full(len(xs), -np.inf)

    def complete(self, xs):
        return np.zeros(len(xs))


class Random(Potential):
    def __init__(self):
        self.rng = np.random.default_rng(0)

    def prefix(self, xs):
        return self.rng.normal(size=len(xs))


@pytest.mark.parametrize("p, match", [
    (BatchDependent(), "alone"),
    (Revives(), "rejection must be final"),
    (Random(), "not deterministic"),
    (Potential.from_callable(lambda xs: np.zeros(2)), "shape"),
])
def test_check_potential_catches_broken_potentials(p, match):
    with pytest.raises(AssertionError, match=match):
        check_potential(p, XS)


def test_check_potential_prefix_rule():
    # rejected as a string prefix but accepted once longer: breaks "rejection is final"
    p = Potential.from_callable(lambda s: 0.0 if len(s) != 2 else -np.inf, batched=False)
    with pytest.raises(AssertionError, match="earlier value"):
        check_potential(p, ["abc"], prefixes=lambda s: [s[:k] for k in range(1, len(s))])
    check_potential(C, XS, prefixes=lambda x: [x * 2])


class TestMixinOnQuadratic(PotentialContractTests):
    def make_potential(self):
        return P * C

    def make_values(self):
        return torch.as_tensor(XS)


def test_repr_names():
    assert repr(P * C ** 2) == "quad * (positive_first) ** 2"
    assert isinstance(CallablePotential(quad), Potential)
