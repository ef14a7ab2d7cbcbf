"""ComfyHost: turns core events into ComfyUI progress, log lines and UI messages; maps Cancel to stop."""

import logging

import comfy.model_management
import comfy.utils
from server import PromptServer

from ..trainer.events import CheckpointSaved, Event, Notice, StepDone

log = logging.getLogger("tunekit")
LOG_EVERY = 10
PROGRESS_EVENT = "tunekit.progress"


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

    def should_stop(self) -> bool:
        return comfy.model_management.processing_interrupted()

    def _step_done(self, event: StepDone) -> None:
        self.progress.update_absolute(event.step, event.total_steps)
        if event.step % LOG_EVERY == 0 or event.step == event.total_steps:
            log.info("TuneKit step %d/%d loss %.4f (%.2f s/step)", event.step, event.total_steps, event.loss, event.seconds)
        PromptServer.instance.send_sync(
            PROGRESS_EVENT,
            {"node": self.node_id, "step": event.step, "total": event.total_steps, "loss": event.loss},
        )
