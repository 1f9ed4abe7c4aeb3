"""Core kernels: exact magnitude selection, sign election, pruning, and the PEFT-compatible merge functions."""
