"""The file names of a PyTorch export folder, shared by its writer (`export.py`) and its reader (`torch_model.py`).

No JAX and no torch, so that both sides can import it.
"""

HEADS_PREFIX = "unires"  # unires.safetensors, or unires-0000i-of-0000n.safetensors + unires.safetensors.index.json
LORA_FILE = "lora.safetensors"  # the kept LoRA factors, PEFT's layout
CONFIG_FILE = "config.json"  # the run's model config, prompt settings and the export summary
