"""The recipe front end: what to merge, decided before any tensor is read.

`schema` (mergekit's YAML, checked), `architectures` (a model's layer stacks
from its config.json and tensor names), `tokenizer` (the output vocabulary and
each model's embedding rows aligned to it, chat templates), `plan` (which
tensors of which models feed each output tensor, with which parameters),
`orbax` (recipes over Orbax checkpoints).
"""
