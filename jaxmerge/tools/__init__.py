"""Tools built on the engine: `adapters` (merging PEFT LoRA adapters without their base model), `multi`
(mergekit-multi files), `extract_lora` (a fine-tune as a LoRA adapter), `moe` (mixtures of experts from mergekit-moe configurations)."""
