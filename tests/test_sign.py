"""calculate_majority_sign_mask and disjoint_merge against PEFT."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from peft.utils import merge_utils as peft

import jaxmerge as jm
from conftest import normal_floats
from conftest import FLOAT_DTYPES, SHAPES, random_tasks, to_numpy, to_torch


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_majority_sign_mask_equals_peft(shape, method, dtype):
    stacked = jnp.stack(random_tasks(shape, 4, dtype=dtype))
    # Zeros never agree with the elected sign.
    stacked = stacked.at[0].set(0)
    ours = np.asarray(jm.calculate_majority_sign_mask(stacked, method))
    theirs = peft.calculate_majority_sign_mask(to_torch(stacked), method).numpy()
    assert ours.dtype == np.bool_
    if dtype == jnp.float32:
        np.testing.assert_array_equal(ours, theirs)
    else:
        # Half-precision sums: we accumulate in float32, PEFT in the input dtype;
        # they may elect differently only where the sum is near zero.
        assert (ours != theirs).mean() < 0.02


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_disjoint_merge_equals_peft(dtype):
    stacked = jnp.stack(random_tasks((33, 65), 3, dtype=dtype))
    mask = jm.calculate_majority_sign_mask(stacked)
    ours = jm.disjoint_merge(stacked, mask)
    theirs = peft.disjoint_merge(to_torch(stacked), torch.from_numpy(np.asarray(mask)))
    assert ours.dtype == dtype
    tol = 0 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(to_numpy(ours), to_numpy(theirs), rtol=tol, atol=tol)


def test_unknown_sign_method_and_mask_shape():
    stacked = jnp.stack(random_tasks((5,), 2))
    with pytest.raises(ValueError, match=r"method.*'median'"):
        jm.calculate_majority_sign_mask(stacked, "median")
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        jm.disjoint_merge(stacked, jnp.ones((3, 5), bool))


@settings(max_examples=50, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.sampled_from([(3, 7), (2, 4, 5), (5, 1)]),
                 elements=normal_floats(1e-3, 100)),
    method=st.sampled_from(["total", "frequency"]),
)
def test_property_sign_mask_and_disjoint_merge(x, method):
    ours = np.asarray(jm.calculate_majority_sign_mask(x, method))
    theirs = peft.calculate_majority_sign_mask(torch.from_numpy(x), method).numpy()
    # With "total" the sign of a float32 sum that cancels to within rounding depends on the order
    # of the additions (torch's vectorised order vs left to right; e.g. 0, 1, a, -1, -a sums to 0
    # in torch and to -1.2e-7 left to right): compare where every order gives the exact sum's sign.
    decided = np.ones(x.shape[1:], bool)
    if method == "total":
        exact = x.astype(np.float64).sum(axis=0)
        decided = np.abs(exact) > x.shape[0] * np.finfo(np.float32).eps * np.abs(x).astype(np.float64).sum(axis=0)
    np.testing.assert_array_equal(ours[:, decided], theirs[:, decided])
    # torch vectorises the sum over a contiguous task axis (shape (5, 1)), so its
    # order differs from the left-to-right one; the summands share a sign (only
    # agreeing values are summed), so that costs at most an ulp per task.
    np.testing.assert_allclose(
        np.asarray(jm.disjoint_merge(x, ours)),
        peft.disjoint_merge(torch.from_numpy(x), torch.from_numpy(theirs)).numpy(),
        rtol=x.shape[0] * np.finfo(np.float32).eps, atol=0,
    )
