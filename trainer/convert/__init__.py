"""Checkpoint and LoRA conversion: exact, offline, safe and light on memory (issue 5).

Small modules, one job each:
- unet_names, kohya_names, arch: layer names in every naming and the facts of SD1 / SD2 / SDXL files.
- lora_keys, lora_detect, lora_metadata, lora_file: LoRA files between kohya, diffusers/PEFT and ComfyUI.
- io: reading with errors a user can act on; writing with nothing half-written left behind.
- ckpt, tensor_files, checkpoint: `.ckpt` read without running it, files streamed tensor by tensor,
  precision / EMA pruning / VAE baking.
- lora_math, checkpoint_keys, merge: LoRAs merged into a checkpoint with ComfyUI's runtime arithmetic.
- svd, extract, resize: LoRAs from a fine-tune minus its base, and rank changes, with their true error.
- diffusers_keys, diffusers_configs, diffusers_folder: single-file checkpoints <-> diffusers folders.
"""
