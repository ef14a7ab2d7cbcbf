"""TuneKit's training core: host-agnostic (imports nothing of ComfyUI).

A host hands a `ModelBridge` (its already-loaded models), a `Dataset` and a `TrainConfig` to a
`TrainSession`, and receives events through its `Host`.
"""
