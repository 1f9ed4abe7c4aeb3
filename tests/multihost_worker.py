"""One of two processes merging one sharded tensor set over 127.0.0.1 (see test_sharding.py).

Args: process id, coordinator port, output directory.
"""

import os
import sys

pid, port = int(sys.argv[1]), sys.argv[2]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxmerge  # noqa: E402

mesh = Mesh(np.array(jax.devices()), ("d",))
sh = NamedSharding(mesh, P("d", None))
rng = np.random.default_rng(0)
host = [rng.standard_normal((64, 32)).astype(np.float32) for _ in range(3)]
arrs = [jax.make_array_from_callback(h.shape, sh, lambda idx, h=h: h[idx]) for h in host]
out = jaxmerge.ties(arrs, [1.0, 0.5, 0.7], 0.2)

full = multihost_utils.process_allgather(out, tiled=True)
print(pid, "devices", len(jax.devices()), "local shards", len(out.addressable_shards), "shape", full.shape, flush=True)
np.save(f"{sys.argv[3]}/result_{pid}.npy", np.asarray(full))
