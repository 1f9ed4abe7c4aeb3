"""Per-device peak memory of a sharded `ties` over 1, 2, 4 and 8 simulated CPU devices.

    python -m benchmarks.sharding_memory

Simulated devices share the machine's cores, so this reports memory (XLA's
memory analysis of the per-device program: arguments + temporaries + output),
not speed-up. Runs itself in a subprocess per device count, since the number
of devices is fixed when JAX starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SHAPE = (4096, 4096)
TASKS = 3


def measure(num_devices: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxmerge.core import merging, selection
    from jaxmerge.core.sharding import make_mesh

    mesh = make_mesh(num_devices)
    sharding = NamedSharding(mesh, P("devices", None))
    tasks = tuple(jax.device_put(np.zeros(SHAPE, np.float32), sharding) for _ in range(TASKS))
    k = selection.density_to_k(0.2, tasks[0].size)
    compiled = merging._merge_kernel.lower(
        tasks, jnp.ones(TASKS), jnp.float32(0.2), k, None,
        sparsify="magnitude", sign_method="total", partitioned=num_devices > 1,
    ).compile()
    stats = compiled.memory_analysis()
    per_device = stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
    return {"devices": num_devices, "per_device_bytes": per_device, "input_bytes_total": TASKS * 4 * SHAPE[0] * SHAPE[1]}


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(measure(int(sys.argv[2]))))
        return 0
    print(f"ties, {TASKS} tasks of {SHAPE[0]}x{SHAPE[1]} float32, sharded on rows; per-device peak from XLA's memory analysis")
    print(f"{'devices':>8}{'per device MB':>15}{'x (inputs / devices)':>22}")
    for n in (1, 2, 4, 8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        out = subprocess.run([sys.executable, "-m", "benchmarks.sharding_memory", "--child", str(n)], env=env, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        share = row["input_bytes_total"] / n
        print(f"{n:>8}{row['per_device_bytes'] / 1e6:>15.1f}{row['per_device_bytes'] / share:>22.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
