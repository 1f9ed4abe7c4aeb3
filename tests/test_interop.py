"""interop: PEFT's merge API on torch tensors through DLPack."""


import numpy as np
import pytest
import torch
from peft.utils import merge_utils as peft

import interop
import jax.numpy as jnp
from conftest import distinct_magnitude_tasks, to_torch
from interop import merge_utils as im

NAMES = [
    "prune", "magnitude_based_pruning", "random_pruning", "calculate_majority_sign_mask", "disjoint_merge",
    "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties", "reshape_weight_task_tensors",
]
W = torch.tensor([1.0, 0.5, -0.7])


def tasks(shape=(64, 33), n=3, dtype=torch.float32, seed=0):
    """Random tasks; in half precision with distinct magnitudes (no ties for PEFT's topk to break arbitrarily)."""
    if dtype in (torch.bfloat16, torch.float16):
        jdtype = {torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16}[dtype]
        return [to_torch(t) for t in distinct_magnitude_tasks(shape, n, dtype=jdtype, seed=seed)]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]


def calls(ts, stacked):
    """One call per function, with PEFT's positional arguments."""
    return {
        "prune": lambda m: m.prune(ts[0], 0.3, "magnitude"),
        "magnitude_based_pruning": lambda m: m.magnitude_based_pruning(ts[0], 0.3),
        "random_pruning": lambda m: m.random_pruning(ts[0], 0.3, True),
        "calculate_majority_sign_mask": lambda m: m.calculate_majority_sign_mask(stacked, "total"),
        "disjoint_merge": lambda m: m.disjoint_merge(stacked, peft.calculate_majority_sign_mask(stacked)),
        "task_arithmetic": lambda m: m.task_arithmetic(ts, W),
        "magnitude_prune": lambda m: m.magnitude_prune(ts, W, 0.3),
        "ties": lambda m: m.ties(ts, W, 0.3, "frequency"),
        "dare_linear": lambda m: m.dare_linear(ts, W, 0.3),
        "dare_ties": lambda m: m.dare_ties(ts, W, 0.3),
        "reshape_weight_task_tensors": lambda m: m.reshape_weight_task_tensors(stacked, W),
    }


def test_same_names_and_signatures_as_peft():
    import inspect

    for name in NAMES:
        ours = inspect.signature(getattr(im, name)).parameters
        theirs = inspect.signature(getattr(peft, name)).parameters
        # PEFT's parameters come first, by name, kind and default; ours may add keyword-only ones.
        for (n1, p1), (n2, p2) in zip(ours.items(), theirs.items()):
            assert (n1, p1.kind, p1.default) == (n2, p2.kind, p2.default), name
        extra = list(ours)[len(theirs):]
        assert all(ours[e].kind is inspect.Parameter.KEYWORD_ONLY for e in extra), name


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("random_pruning", "dare_linear", "dare_ties")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_deterministic_parity_and_dtype(name, dtype):
    ts = tasks(dtype=dtype)
    stacked = torch.stack(ts)
    ours = calls(ts, stacked)[name](im)
    theirs = calls(ts, stacked)[name](peft)
    assert ours.dtype == theirs.dtype, (name, dtype)
    assert ours.shape == theirs.shape and ours.device == theirs.device
    if dtype == torch.float32 and name in ("prune", "magnitude_based_pruning", "calculate_majority_sign_mask", "ties", "disjoint_merge", "reshape_weight_task_tensors"):
        assert torch.equal(ours, theirs), name
    elif ours.dtype == torch.bool:
        # Half sums: float32 accumulation may elect differently where the sum is ~0.
        assert (ours != theirs).float().mean() < 0.02
    else:
        a, b = ours.double(), theirs.double()
        tol = 1e-6 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["random_pruning", "dare_linear", "dare_ties"])
def test_random_methods_reproduce_under_manual_seed_and_generator(name):
    ts = tasks()
    stacked = torch.stack(ts)
    call = calls(ts, stacked)[name]
    torch.manual_seed(123)
    a = call(im)
    torch.manual_seed(123)
    b = call(im)
    torch.manual_seed(124)
    c = call(im)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    if name == "random_pruning":
        x, y = im.random_pruning(ts[0], 0.3, True, generator=g1), im.random_pruning(ts[0], 0.3, True, generator=g2)
    else:
        x, y = getattr(im, name)(ts, W, 0.3, generator=g1), getattr(im, name)(ts, W, 0.3, generator=g2)
    assert torch.equal(x, y)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_random_methods_statistically_equivalent_to_peft(density):
    x = torch.ones(256, 256)
    n = x.numel()
    sigma = (n * density * (1 - density)) ** 0.5
    torch.manual_seed(0)
    ours = im.random_pruning(x, density, True)
    theirs = peft.random_pruning(x, density, True)
    for out in (ours, theirs):
        assert abs(int(torch.count_nonzero(out)) - n * density) <= 6 * sigma
        assert abs(out.mean().item() - 1.0) <= 6 * sigma / (n * density)


def test_zero_copy_both_ways_and_copies_when_unavoidable():
    t = torch.randn(1024, 1024)
    assert t.data_ptr() % 64 == 0
    j = interop.to_jax(t)
    assert j.unsafe_buffer_pointer() == t.data_ptr()
    back = interop.to_torch(j * 2)
    assert back.data_ptr() == (j * 2).unsafe_buffer_pointer() or back.dtype == torch.float32
    out = j * 2
    assert interop.to_torch(out).data_ptr() == out.unsafe_buffer_pointer()
    # Misaligned storage: JAX copies, values still right.
    storage = torch.randn(1024 * 1024 + 16)
    misaligned = storage[1 : 1 + 1024 * 1024]
    jm = interop.to_jax(misaligned)
    assert jm.unsafe_buffer_pointer() != misaligned.data_ptr()
    np.testing.assert_array_equal(np.asarray(jm), misaligned.numpy())
    # Non-contiguous views: copied, values right.
    for view in (t.T, t[::2, 1::3], torch.randn(4, 1).expand(4, 8)):
        jv = interop.to_jax(view)
        np.testing.assert_array_equal(np.asarray(jv), view.contiguous().numpy())


def test_views_requires_grad_and_list_weights_are_accepted():
    base = tasks((32, 32))
    views = [base[0].T, base[1][::1, :], torch.randn(32, 1).expand(32, 32)]
    torch.testing.assert_close(im.ties(views, [1.0, 0.5, 0.7], 0.5), peft.ties(views, torch.tensor([1.0, 0.5, 0.7]), 0.5), rtol=0, atol=0)
    grad = [t.clone().requires_grad_(True) for t in base]
    out = im.ties(grad, W, 0.5)
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out, peft.ties([t.detach() for t in grad], W, 0.5), rtol=0, atol=0)


def test_integer_tensors_and_bool_masks():
    ints = [torch.arange(-6, 6).reshape(3, 4) * s for s in (1, -2, 3)]
    assert im.magnitude_based_pruning(ints[0], 0.5).dtype == peft.magnitude_based_pruning(ints[0], 0.5).dtype == torch.int64
    torch.testing.assert_close(im.magnitude_based_pruning(ints[2], 0.25), peft.magnitude_based_pruning(ints[2], 0.25))
    assert im.ties(ints, torch.ones(3), 0.5).dtype == peft.ties(ints, torch.ones(3), 0.5).dtype
    stacked = torch.stack(tasks())
    mask = im.calculate_majority_sign_mask(stacked)
    assert mask.dtype == torch.bool
    torch.testing.assert_close(im.disjoint_merge(stacked, mask), peft.disjoint_merge(stacked, mask), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_inputs_never_written_and_results_independent(name):
    ts = tasks()
    stacked = torch.stack(ts)
    before = [t.clone() for t in ts] + [stacked.clone(), W.clone()]
    call = calls(ts, stacked)[name]
    torch.manual_seed(0)
    first = call(im)
    for t, b in zip(ts + [stacked, W], before):
        assert torch.equal(t, b), f"{name} modified an input"
    reference = first.clone()
    first.add_(1) if first.dtype != torch.bool else first.logical_not_()
    torch.manual_seed(0)
    again = call(im)
    assert torch.equal(again, reference), f"{name}: modifying a result changed a later call"
    for t, b in zip(ts + [stacked, W], before):
        assert torch.equal(t, b), f"{name}: modifying a result changed an input"


def test_prune_density_one_returns_an_independent_copy():
    x = torch.randn(16)
    with pytest.warns(UserWarning, match="no pruning"):
        out = im.prune(x, 1.0, "magnitude")
    out.mul_(0)
    assert x.abs().sum() > 0


def test_bad_input_raises_before_work():
    ts = tasks()
    with pytest.raises(ValueError, match="2 weights for 3 task tensors"):
        im.ties(ts, torch.tensor([1.0, 1.0]), 0.5)
    with pytest.raises(ValueError, match=r"method.*'sideways'"):
        im.prune(ts[0], 0.5, "sideways")
    with pytest.raises(ValueError, match=r"density=-0\.5"):
        im.magnitude_prune(ts, W, -0.5)
    with pytest.raises(ValueError, match=r"\(64, 33\).*\(2, 2\)"):
        im.task_arithmetic([ts[0], torch.zeros(2, 2)], torch.ones(2))
    with pytest.raises(ValueError, match="at least one task"):
        im.task_arithmetic([], torch.ones(0))
    with pytest.raises(ValueError, match="meta"):
        im.task_arithmetic([ts[0], torch.zeros(64, 33, device="meta")], torch.ones(2))


@pytest.mark.gpu
def test_cuda_tensors_stay_on_their_device():
    import jax

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device in this environment (torch.cuda.is_available() is False)")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX has no GPU backend here (install jax[cuda])")
    ts = [t.cuda() for t in tasks()]
    out = im.ties(ts, W.cuda(), 0.3)
    assert out.device == ts[0].device
    torch.testing.assert_close(out, peft.ties(ts, W.cuda(), 0.3), rtol=1e-6, atol=1e-6)
    j = interop.to_jax(ts[0])
    assert j.unsafe_buffer_pointer() == ts[0].data_ptr()
