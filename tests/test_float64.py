"""float64 with jax_enable_x64: exact against PEFT in float64, counts in uint64.

x64 must be set before JAX starts, so this runs in a fresh interpreter.
"""

import subprocess
import sys
import textwrap


def test_float64_under_x64_matches_peft():
    script = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, numpy as np, torch
        from peft.utils import merge_utils as peft
        import jaxmerge as jm
        from jaxmerge.core._dtypes import count_dtype
        assert count_dtype() == jnp.uint64
        rng = np.random.default_rng(0)
        tasks = [rng.standard_normal((40, 30)) for _ in range(3)]
        w = [1.0, -0.5, 0.7]
        for density in (0.0, 0.1, 0.5, 0.9, 1.0):
            ours = jm.ties(tasks, w, density)
            assert ours.dtype == jnp.float64, ours.dtype
            theirs = peft.ties([torch.from_numpy(t) for t in tasks], torch.tensor(w, dtype=torch.float64), density)
            np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())
            np.testing.assert_array_equal(
                np.asarray(jm.magnitude_based_pruning(tasks[0], density)),
                peft.magnitude_based_pruning(torch.from_numpy(tasks[0]), density).numpy() if density < 1 else tasks[0],
            )
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
