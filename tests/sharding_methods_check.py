"""Every method of the table on a mesh of 8 simulated CPU devices equals one device.

Run in a subprocess (device counts are fixed when JAX starts; see test_sharding.py).
Prints one line per method and "all method sharding checks passed".
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxmerge.core.sharding import make_mesh  # noqa: E402
from jaxmerge.methods import _table as table  # noqa: E402
from jaxmerge.methods.pytree import merge_params  # noqa: E402

# Methods whose result goes through a float sum over a whole tensor (norms, dot products, SVDs,
# DELLA's and SCE's statistics): on a mesh XLA adds the per-device partial sums in another order,
# so they agree within float32 rounding (measured: at most 2.1e-7), not bit for bit. Every other
# method (selections by exact counts, element-wise arithmetic) must give the same bits.
REDUCING = {"tsv_m", "iso_c", "iso_cts", "wudi", "karcher", "multislerp", "slerp", "nuslerp", "della", "della_linear", "sce",
            "model_stock"}

assert len(jax.devices()) == 8
mesh = make_mesh(8)
rng = np.random.default_rng(0)


def tree(seed_shift: float):
    # A matrix whose 37 rows do not divide by 8, so `leaf_sharding` splits its 24 columns instead, and a vector
    # split in 8 (each compiled shape costs time).
    return {
        "w": jnp.asarray(rng.standard_normal((37, 24)).astype(np.float32) * 0.1 + seed_shift),
        "b": jnp.asarray(rng.standard_normal((40,)).astype(np.float32) * 0.1 + seed_shift),
    }


base_tree = tree(0.0)
model_trees = [jax.tree.map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape).astype(np.float32) * 0.05), base_tree) for _ in range(3)]

failures = []
for spec in table.all_methods():
    has_base = spec.base is not table.BasePolicy.IGNORED
    inputs = min(3 if spec.max_models is None else spec.max_models, 4)
    inputs = max(inputs, spec.min_models)
    models = model_trees[: inputs - has_base] if has_base else model_trees[:inputs]
    params = {}
    if "weight" in spec.param_names:
        params["weight"] = [1.0, 0.6, 0.8][: len(models)]
    if "t" in spec.param_names:
        params["t"] = 0.3
    if "density" in spec.param_names:
        params["density"] = 0.5
    kwargs = dict(method=spec.name, base=base_tree if has_base else None, key=jax.random.key(5) if spec.random else None, **params)
    one = merge_params(models, **kwargs)
    many = merge_params(models, mesh=mesh, **kwargs)
    for name in one:
        a, b = np.asarray(one[name]), np.asarray(many[name])
        same = np.array_equal(a, b) if spec.name not in REDUCING else np.allclose(a, b, rtol=1e-5, atol=1e-6)
        if not same:
            failures.append(f"{spec.name} {name}: max difference {np.max(np.abs(a - b)):.3g}")
    for name in one:  # the comparison means nothing on a replicated tensor
        if many[name].sharding.is_fully_replicated:
            failures.append(f"{spec.name} {name}: merged replicated, not split over the mesh")
    print("ok" if not failures or not failures[-1].startswith(spec.name) else "FAIL", spec.name,
          f"w split as {many['w'].sharding.spec}")

if failures:
    print("\n".join(failures))
    sys.exit(1)
print("all method sharding checks passed")
