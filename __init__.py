"""TuneKit: train LoRAs on the models your ComfyUI graph already loaded.

ComfyUI imports this folder as a package under whatever name it was cloned into. Keep this
file free of host imports so `python -m tunekit` and the tests can import the package too.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import TuneKitExtension

    return TuneKitExtension()
