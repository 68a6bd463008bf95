"""The trigger noun, in Neural Cleanse's vocabulary: a mask and a pattern.

Stamping a trigger on an image x gives ``(1 - m) * x + m * p`` with the mask m (H x W, values in
[0, 1], shared by all channels) and the pattern p (C x H x W, values in [0, 1]). A BadNets patch is
a binary mask; a blended trigger (Chen et al. 2017) is a constant mask equal to its alpha.
Reverse-engineered triggers from a scan use the same form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import NetcleanseError


@dataclass
class Trigger:
    mask: torch.Tensor  # (H, W) in [0, 1]
    pattern: torch.Tensor  # (C, H, W) in [0, 1]

    def __post_init__(self):
        self.mask = torch.as_tensor(self.mask, dtype=torch.float32)
        self.pattern = torch.as_tensor(self.pattern, dtype=torch.float32)
        if self.mask.dim() != 2 or self.pattern.dim() != 3 or self.pattern.shape[1:] != self.mask.shape:
            raise NetcleanseError(f"trigger mask {tuple(self.mask.shape)} and pattern {tuple(self.pattern.shape)} "
                                  "must be (H, W) and (C, H, W)")

    @property
    def l1(self) -> float:
        """Mask L1 norm: the trigger's size as Neural Cleanse measures it."""
        return float(self.mask.abs().sum())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on a batch of NCHW images in [0, 1]."""
        if tuple(x.shape[1:]) != tuple(self.pattern.shape):
            raise NetcleanseError(f"trigger of shape {tuple(self.pattern.shape)} does not fit images "
                                  f"of shape {tuple(x.shape[1:])}")
        m = self.mask.to(x.device)
        return (1 - m) * x + m * self.pattern.to(x.device)

    def fusion(self) -> torch.Tensor:
        """mask * pattern, the image Neural Cleanse shows as the trigger."""
        return self.mask * self.pattern


def need_triggers(triggers: dict, goal: str) -> None:
    """Refuse an empty ``{label: Trigger}`` (a scan that flagged nothing) for a repair that needs the
    reversed triggers to ``goal`` ("unlearn", "build a filter from")."""
    if not triggers:
        raise NetcleanseError(f"the scan flagged no label, so there is no reversed trigger to {goal}")
