"""Tools built on the engine: `adapters` (merging PEFT LoRA adapters without their base model)."""
