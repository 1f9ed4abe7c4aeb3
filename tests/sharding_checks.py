"""Run in a subprocess with 8 simulated CPU devices (see test_sharding.py)."""

import os
import re
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxmerge  # noqa: E402
from jaxmerge.core import merging  # noqa: E402
from jaxmerge.methods.pytree import merge_params  # noqa: E402
from jaxmerge.core.sharding import make_mesh  # noqa: E402

assert len(jax.devices()) == 8
devices = np.array(jax.devices())
rng = np.random.default_rng(0)
W = [1.0, 0.5, -0.7]
KEY = jax.random.key(3)
# Compiling dominates this script: each function compiles once per shape and sharding. The three
# evenly laid out cases share one shape, so the single-device results they compare against compile
# once (their shards and samples still split evenly on every mesh axis).
EVEN = (1024, 512)
CASES = [
    ((8,), ("x",), P("x", None), EVEN),
    ((4, 2), ("x", "y"), P("x", "y"), EVEN),
    ((8,), ("x",), P(None, "x"), EVEN),
    ((8,), ("x",), P("x", None), (1000, 300)),  # 1000 rows do not divide by 8: padded shards
    ((2, 4), ("x", "y"), P("y", "x"), (36, 1002)),  # neither axis divides evenly
]
CALLS = {
    "ties": lambda t: jaxmerge.ties(t, W, 0.2),
    "ties_frequency": lambda t: jaxmerge.ties(t, W, 0.5, "frequency"),
    "magnitude_prune": lambda t: jaxmerge.magnitude_prune(t, W, 0.3),
    "task_arithmetic": lambda t: jaxmerge.task_arithmetic(t, W),
    "dare_linear": lambda t: jaxmerge.dare_linear(t, W, 0.3, key=KEY),
    "dare_ties": lambda t: jaxmerge.dare_ties(t, W, 0.3, key=KEY),
    "magnitude_based_pruning": lambda t: jaxmerge.magnitude_based_pruning(t[0], 0.1),
    "prune_random": lambda t: jaxmerge.prune(t[0], 0.4, "random", rescale=True, key=KEY),
}


def ties_program(sharded) -> str:
    """The compiled text of the merge kernel that `jaxmerge.ties(sharded, W, 0.2)` runs.

    The kernel's arguments are recorded as ties passes them, so lowering them again finds the
    executable that ran in JAX's caches (lowering look-alike arguments compiled it anew: 2-3 s a case).
    """
    calls = []
    kernel = merging._merge_kernel
    merging._merge_kernel = lambda *args, **kwargs: calls.append((args, kwargs)) or kernel(*args, **kwargs)
    try:
        jaxmerge.ties(sharded, W, 0.2)
    finally:
        merging._merge_kernel = kernel
    [(args, kwargs)] = calls
    assert kwargs["rule"] == merging.PEFT_TIES and kwargs["partitioned"] is True, kwargs
    return kernel.lower(*args, **kwargs).compile().as_text()


for mesh_shape, names, spec, shape in CASES:
    mesh = Mesh(devices.reshape(mesh_shape), names)
    sharding = NamedSharding(mesh, spec)
    host = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    host[1][::7] = host[1][::7].round(1)  # ties at the threshold exercise the tie break
    sharded = [jax.device_put(h, sharding) for h in host]
    local = [jnp.asarray(h) for h in host]
    for name, call in CALLS.items():
        got, want = call(sharded), call(local)
        assert np.array_equal(np.asarray(got), np.asarray(want)), (name, mesh_shape, spec, shape)
        assert got.sharding.is_equivalent_to(sharding, len(shape)), (name, got.sharding, sharding)
    stacked = jax.device_put(np.stack(host), NamedSharding(mesh, P(None, *spec)))
    mask = jaxmerge.calculate_majority_sign_mask(stacked)
    assert np.array_equal(np.asarray(mask), np.asarray(jaxmerge.calculate_majority_sign_mask(np.stack(host))))
    assert np.array_equal(np.asarray(jaxmerge.disjoint_merge(stacked, mask)), np.asarray(jaxmerge.disjoint_merge(np.stack(host), np.asarray(mask))))
    # The sharded ties program gathers no full tensor: only per-row counts and the sample.
    text = ties_program(sharded)
    for match in re.finditer(r"= \w+\[([\d,]*)\]\{[^}]*\} all-gather\(", text):
        elements = int(np.prod([int(d) for d in match.group(1).split(",") if d] or [1]))
        assert elements < host[0].size // 4, f"all-gather of {elements} elements in {mesh_shape} {spec}"
    print("ok", mesh_shape, spec, shape)

# The same key gives the same DARE mask on 1, 2, 4 and 8 devices.
host = [rng.standard_normal((256, 64)).astype(np.float32) for _ in range(3)]
results = []
for n in (1, 2, 4, 8):
    mesh = make_mesh(n)
    tasks = [jax.device_put(h, NamedSharding(mesh, P("devices", None))) for h in host]
    results.append(np.asarray(jaxmerge.dare_ties(tasks, W, 0.5, key=KEY)))
assert all(np.array_equal(results[0], r) for r in results[1:])

# merge_params with a mesh equals merge_params without one.
trees = [{"a": jnp.asarray(h), "b": {"c": jnp.asarray(h[:, :3])}} for h in host]
one = merge_params(trees, W, method="dare_ties", density=0.5, key=KEY)
many = merge_params(trees, W, method="dare_ties", density=0.5, key=KEY, mesh=make_mesh(8))
assert len(many["a"].sharding.device_set) == 8
jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), one, many)
print("all sharding checks passed")
sys.exit(0)
