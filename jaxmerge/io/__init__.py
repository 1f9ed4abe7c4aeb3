"""Model-file I/O: safetensors checkpoints, LoRA adapters, recipes, atomic outputs."""
