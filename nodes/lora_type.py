"""The LORA_MODEL value TuneKit passes along: ComfyUI's own type (a dict of tensors), in kohya keys,
carrying the `ss_*` metadata the Save node writes."""


class KohyaLoRA(dict):
    def __init__(self, tensors: dict, metadata: dict[str, str]):
        super().__init__(tensors)
        self.metadata = metadata
