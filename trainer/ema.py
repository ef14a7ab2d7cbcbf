"""Exponential moving average of the trained weights: shadow = decay * shadow + (1 - decay) * weight after
every optimizer step, with the usual warm-up min(decay, (1 + n) / (10 + n)) (diffusers' EMAModel) so early
averages are not dominated by the initialisation."""

import torch


class EMA:
    def __init__(self, parameters: list[torch.nn.Parameter], decay: float):
        self.parameters = list(parameters)
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().clone() for p in self.parameters]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.parameters], 1 - self.current_decay())
        self.updates += 1

    @torch.no_grad()
    def swapped_in(self) -> list[torch.Tensor]:
        """Copy the averages into the parameters; returns the raw values to restore with `restore`."""
        raw = [p.detach().clone() for p in self.parameters]
        torch._foreach_copy_([p.data for p in self.parameters], self.shadow)
        return raw

    @torch.no_grad()
    def restore(self, raw: list[torch.Tensor]) -> None:
        torch._foreach_copy_([p.data for p in self.parameters], raw)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": [s.cpu() for s in self.shadow]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for mine, saved in zip(self.shadow, state["shadow"], strict=True):
            mine.copy_(saved)
