"""The ComfyUI layer: the only code that imports ComfyUI. Nodes are thin shells over trainer/."""
