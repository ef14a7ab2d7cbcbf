"""One process of a data-parallel run, started by test_parallel.py through torchrun (what `accelerate launch`
runs on several GPUs), on the tiny denoiser and the gloo backend:

    python -m torch.distributed.run --standalone --nproc_per_node 2 parallel_worker.py OUT '{"steps": 6, ...}'

Settings: TrainConfig fields, plus "stop_at" (process 2 alone asks to stop before that step, as a Ctrl-C
seen by one process) and "resume" (continue the newest state in OUT/run). Each process writes its trained
weights to OUT/weights_<rank>.pt and its losses and steps to OUT/result_<rank>.json.
"""

import json
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if "tunekit" not in sys.modules:
    package = types.ModuleType("tunekit")
    package.__path__ = [str(HERE.parents[1])]
    sys.modules["tunekit"] = package

import torch
import torch.distributed as dist
from fakes import RecordingHost
from helpers import make_session
from tunekit.trainer.checkpoints import latest_state_folder
from tunekit.trainer.parallel import DataParallel


class StopOnOneProcess(RecordingHost):
    """Asks to stop before step `stop_at`, on process 2 only."""

    def __init__(self, session_step, stop_at: int | None):
        super().__init__()
        self.session_step, self.stop_at = session_step, stop_at

    def should_stop(self) -> bool:
        return self.stop_at is not None and dist.get_rank() == 1 and self.session_step() >= self.stop_at


def main(out: Path, settings: dict) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    stop_at, resume = settings.pop("stop_at", None), settings.pop("resume", False)
    session = make_session(out / "run", parallel=DataParallel.from_process_group(), **settings)
    if resume:
        session.resume(latest_state_folder(out / "run"))
    result = session.run(StopOnOneProcess(lambda: session.step, stop_at))
    rank = dist.get_rank()
    torch.save(session.network.state_dict(), out / f"weights_{rank}.pt")
    report = {"steps": result.steps_done, "stopped_early": result.stopped_early, "losses": result.losses,
              "run_dir": str(session.run_dir)}
    (out / f"result_{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
