"""File formats, read and written; no merging here.

`safetensors_io` (checkpoints opened read-only, the streamed shard writer),
`hf_model` (Hugging Face model directories: Hub ids, config.json, tokenizer
files, the model card), `torch_bin` (PyTorch `.bin` checkpoints through a
restricted unpickler), `lora` (PEFT LoRA adapters: configuration, scaling,
delta weights).
"""
