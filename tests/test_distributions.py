"""Uniform / ER / ERK / custom splits of a global sparsity."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest

from sparsejax import distributions

LENET = [(784, 300), (300, 100), (100, 10)]
CONV = [(5, 5, 1, 20), (5, 5, 20, 50), (800, 500), (500, 10)]


def test_uniform_gives_every_layer_the_same_sparsity():
  counts = distributions.allocate_nnz(LENET, 0.9, "uniform")
  assert counts == [23520, 3000, 100]


@pytest.mark.parametrize("name,shapes", [("er", LENET), ("erk", CONV)])
def test_er_family_is_proportional_to_the_raw_density_with_dense_caps(name, shapes):
  sparsity = 0.9
  counts = distributions.allocate_nnz(shapes, sparsity, name)
  dens = [n / math.prod(s) for n, s in zip(counts, shapes, strict=True)]
  raw = [(sum(s) / math.prod(s)) if name == "erk" else (sum(s[-2:]) / math.prod(s[-2:]))
         for s in shapes]
  sparse = [i for i, d in enumerate(dens) if d < 1.0]
  assert len(sparse) < len(shapes)  # at 90 % both nets have a layer that would exceed 1
  eps = [dens[i] / raw[i] for i in sparse]
  np.testing.assert_allclose(eps, eps[0], rtol=2e-3)  # one ε, up to integer rounding
  for i in set(range(len(shapes))) - set(sparse):
    assert eps[0] * raw[i] > 1.0  # capped layers are exactly those that would exceed 1
  total = sum(math.prod(s) for s in shapes)
  assert sum(counts) == round(0.1 * total)


def test_er_lenet_matches_hand_computation():
  # Last layer (100×10): raw 0.11 is capped → dense (1000); ε over the rest:
  # (26620 − 1000) / (1084 + 400) = 17.2641...
  counts = distributions.allocate_nnz(LENET, 0.9, "er")
  eps = (26620 - 1000) / (1084 + 400)
  assert counts[2] == 1000
  assert abs(counts[0] - eps * 1084) <= 1 and abs(counts[1] - eps * 400) <= 1


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64)), min_size=1, max_size=5),
       st.floats(0.0, 0.99), st.sampled_from(distributions.DISTRIBUTIONS))
def test_global_nnz_is_exact_and_within_bounds(shapes, sparsity, name):
  counts = distributions.allocate_nnz(shapes, sparsity, name)
  total = sum(math.prod(s) for s in shapes)
  assert sum(counts) == round((1 - sparsity) * total)
  assert all(0 <= n <= math.prod(s) for n, s in zip(counts, shapes, strict=True))


def test_mapping_pins_named_layers_and_defaults_the_rest():
  names = ["Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]
  counts = distributions.allocate_nnz_by_name(names, LENET, 0.9, {"Dense_2/kernel": 0.0})
  assert counts == [23520, 3000, 1000]


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan")])
def test_bad_sparsity(sparsity):
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
    distributions.allocate_nnz(LENET, sparsity)


def test_unknown_distribution_and_unknown_path():
  with pytest.raises(ValueError, match="unknown distribution 'erdos'"):
    distributions.allocate_nnz(LENET, 0.5, "erdos")
  with pytest.raises(ValueError, match=r"\['nope'\]"):
    distributions.allocate_nnz_by_name(["a"], [(4, 4)], 0.5, {"nope": 0.5})
