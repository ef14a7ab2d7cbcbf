"""ComfyHost: turns core events into ComfyUI progress, log lines and UI messages; maps Cancel to stop."""

import logging
import math
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
from server import PromptServer

from ..trainer.events import CheckpointSaved, Event, Notice, SamplesSaved, StepDone, ValidationLoss

log = logging.getLogger("tunekit")
LOG_EVERY = 10
PROGRESS_EVENT = "tunekit.progress"
VALIDATION_EVENT = "tunekit.validation"
SAMPLE_EVENT = "tunekit.sample"


class ComfyHost:
    def __init__(self, node_id: str | None, total_steps: int):
        self.node_id = node_id
        self.progress = comfy.utils.ProgressBar(total_steps, node_id=node_id)

    def emit(self, event: Event) -> None:
        if isinstance(event, StepDone):
            self._step_done(event)
        elif isinstance(event, CheckpointSaved):
            kind = "partial (resumable)" if event.partial else "final"
            log.info("TuneKit saved the %s training state at step %d: %s", kind, event.step, event.path)
        elif isinstance(event, Notice):
            log.info("TuneKit: %s", event.message)
        elif isinstance(event, ValidationLoss):
            self._validated(event)
        elif isinstance(event, SamplesSaved):
            images = [ref for ref in map(output_reference, event.paths) if ref]
            PromptServer.instance.send_sync(SAMPLE_EVENT, {"node": self.node_id, "step": event.step, "images": images})

    def should_stop(self) -> bool:
        return comfy.model_management.processing_interrupted()

    def _step_done(self, event: StepDone) -> None:
        self.progress.update_absolute(event.step, event.total_steps)
        if event.step % LOG_EVERY == 0 or event.step == event.total_steps:
            log.info("TuneKit step %d/%d loss %.4f (%.2f s/step)", event.step, event.total_steps, event.loss, event.seconds)
        PromptServer.instance.send_sync(
            PROGRESS_EVENT,
            {"node": self.node_id, "step": event.step, "total": event.total_steps,
             "loss": event.loss if math.isfinite(event.loss) else None},  # JSON has no NaN (not yet read back)
        )

    def _validated(self, event: ValidationLoss) -> None:
        log.info("TuneKit step %d validation loss %.4f (%d held-out images)", event.step, event.loss, event.images)
        PromptServer.instance.send_sync(
            VALIDATION_EVENT, {"node": self.node_id, "step": event.step, "loss": event.loss, "train_loss": event.train_loss}
        )


def output_reference(path: Path) -> dict | None:
    """How ComfyUI's /view serves a file of the output directory (what the web UI loads)."""
    output = Path(folder_paths.get_output_directory()).resolve()
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(output):
        return None
    relative = resolved.relative_to(output)
    return {"filename": relative.name, "subfolder": relative.parent.as_posix(), "type": "output"}
