"""The one streamed merge engine every tool runs on.

`stream` (plan a merge and run it tensor by tensor: read, merge, write),
`_pipeline` (the overlapped read/merge/write loop and its profile), `_atomic`
(outputs complete or absent), `_ahead` (kernels compiled while the first
tensors are read), `compile_cache`, `_finite` (non-finite input checks),
`distributed` (several processes writing one output), `orbax` (the Orbax
checkpoint merge).
"""
