"""Write tests/reference/subspace_reference.npz: FusionBench's subspace merges on seeded random task vectors.

The oracle of `tests/test_subspace.py` (TSV-M, Iso-C, Iso-CTS, WUDI). It runs
FusionBench's own functions, on the CPU, in float32:

* TSV-M (Gargiulo et al., 2025, arXiv:2412.00081):
  `fusion_bench.method.task_singular_vector.utils.TSVM_utils.compute_and_sum_svd_mem_reduction`,
  with the scalings of `TaskSingularVectorMerging.run` (a list `alpha` scales
  each task vector before, a scalar `alpha` the merged one after;
  `fusion_bench.utils.state_dict_arithmetic.state_dict_mul`).
* Iso-C / Iso-CTS (Marczak et al., 2025, arXiv:2502.04959):
  `fusion_bench.method.isotropic_merging.iso_utils.iso_c` and `.iso_cts`.
* WUDI (Cheng et al., 2025, arXiv:2503.08099): `fusion_bench.method.wudi.wudi_merging`
  (Adam, lr 1e-5 fixed in FusionBench). One extra case runs the same function
  with `torch.optim.Adam` given lr 1e-3 (patched for that call only) to cover
  jaxmerge's `lr` parameter.

Inputs: per task set, a few task vectors for a 32x24, a 16x16 and a 12x20
matrix and a 24-entry bias, `0.01 * (0.5 * shared + own)` with standard normal
`shared` (one per tensor) and `own` (one per task), from
`numpy.random.default_rng(SEED)`; set "t3" has 3 tasks, "t4" 4. The npz holds
every input and output as float32 and `inputs_sha256`, the SHA-256 of the inputs
(`inputs_digest`), which the tests pin.

Run it (from the repository root) in a separate virtual environment, never in
the project's .venv:

    python3 -m venv /work/fbvenv && . /work/fbvenv/bin/activate
    pip install torch==2.13.0          # the CPU build
    pip install fusion-bench==0.2.33
    python tests/reference/make_subspace_reference.py

Versions used for the committed file: Python 3.11, torch 2.13.0+cpu,
fusion-bench 0.2.33, NumPy 2.4.6.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import numpy as np

SEED = 20250
SHAPES = {"w1": (32, 24), "w2": (16, 16), "w3": (12, 20), "b": (24,)}
TASK_SETS = {"t3": 3, "t4": 4}
TSVM_ALPHA_LIST = {"t3": [0.5, 1.5, -0.25], "t4": [1.0, 0.25, 2.0, 0.75]}
TSVM_ALPHA = 0.7
ISO_CTS_FRACTIONS = (0.8, 0.5)
WUDI_ITER = 400
WUDI_FAST = {"lr": 1e-3, "iter_num": 50}
OUT = Path(__file__).with_name("subspace_reference.npz")


def make_inputs(seed: int = SEED) -> dict[str, np.ndarray]:
    """Task vectors `in_<set>_<tensor>`, each stacked (num_tasks, *shape), float32."""
    rng = np.random.default_rng(seed)
    out = {}
    for set_name, num_tasks in TASK_SETS.items():
        for name, shape in SHAPES.items():
            shared = rng.standard_normal(shape)
            own = rng.standard_normal((num_tasks, *shape))
            out[f"in_{set_name}_{name}"] = (0.01 * (0.5 * shared + own)).astype(np.float32)
    return out


def inputs_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the inputs' names, shapes, dtypes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(k for k in arrays if k.startswith("in_")):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.shape}:{a.dtype.str};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _state_dicts(inputs, set_name):
    """One state dict of torch tensors per task (FusionBench's task-vector format)."""
    import torch

    num_tasks = TASK_SETS[set_name]
    return [
        {name: torch.from_numpy(inputs[f"in_{set_name}_{name}"][i].copy()) for name in SHAPES}
        for i in range(num_tasks)
    ]


def _save(out, prefix, state_dict):
    for name, t in state_dict.items():
        out[f"{prefix}_{name}"] = t.detach().cpu().numpy().astype(np.float32)


@contextlib.contextmanager
def _adam_lr(new_lr):
    """Give FusionBench's `torch.optim.Adam(..., lr=1e-5)` another learning rate for one call."""
    import torch

    original = torch.optim.Adam

    def adam(params, lr=None, **kwargs):  # noqa: ARG001 - FusionBench's lr is replaced
        return original(params, lr=new_lr, **kwargs)

    torch.optim.Adam = adam
    try:
        yield
    finally:
        torch.optim.Adam = original


def main() -> None:
    import torch
    from fusion_bench.method.isotropic_merging import iso_utils
    from fusion_bench.method.task_singular_vector.utils import TSVM_utils
    from fusion_bench.method.wudi import wudi_merging
    from fusion_bench.utils.state_dict_arithmetic import state_dict_mul

    torch.manual_seed(0)
    inputs = make_inputs()
    out = dict(inputs)
    # FusionBench prints every key and draws progress bars.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for set_name in TASK_SETS:
            tvs = _state_dicts(inputs, set_name)
            tsvm = TSVM_utils.compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu")
            _save(out, f"tsv_m_{set_name}", tsvm)
            _save(out, f"tsv_m_alpha_{set_name}", state_dict_mul(tsvm, TSVM_ALPHA))
            scaled = [state_dict_mul(tv, a) for tv, a in zip(_state_dicts(inputs, set_name), TSVM_ALPHA_LIST[set_name])]
            _save(out, f"tsv_m_list_{set_name}", TSVM_utils.compute_and_sum_svd_mem_reduction(scaled, accelerator="cpu"))
            _save(out, f"iso_c_{set_name}", iso_utils.iso_c(_state_dicts(inputs, set_name), accelerator="cpu"))
            for fraction in ISO_CTS_FRACTIONS:
                merged = iso_utils.iso_cts(_state_dicts(inputs, set_name), fraction, accelerator="cpu")
                _save(out, f"iso_cts_{fraction:g}_{set_name}", merged)
        tvs = _state_dicts(inputs, "t3")
        _save(out, "wudi_t3", wudi_merging(tvs, accelerator="cpu", iter_num=WUDI_ITER))
        with _adam_lr(WUDI_FAST["lr"]):
            merged = wudi_merging(_state_dicts(inputs, "t3"), accelerator="cpu", iter_num=WUDI_FAST["iter_num"])
        _save(out, "wudi_fast_t3", merged)
    out["inputs_sha256"] = np.array(inputs_digest(inputs))
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes), inputs sha256 {out['inputs_sha256']}")


if __name__ == "__main__":
    main()
