"""The dataset noun: :class:`Dataset`, and :func:`load_data` for every format netcleanse reads.

Contract: ``x`` is float32 NCHW with pixels in [0, 1]; ``y`` is int64 labels or None.
Loaders convert on the way in (uint8 -> /255, NHWC -> NCHW), so nothing downstream guesses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import NetcleanseError


@dataclass
class Dataset:
    x: torch.Tensor
    y: torch.Tensor | None = None
    source: str = "memory"
    names: list[str] | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.x, torch.Tensor) or self.x.dim() != 4:
            raise NetcleanseError(f"{self.source}: images must be a 4-D NCHW array")
        if self.x.dtype != torch.float32:
            raise NetcleanseError(f"{self.source}: images must be float32 in [0,1], got {self.x.dtype}")
        if self.y is not None:
            if self.y.dim() != 1 or len(self.y) != len(self.x):
                raise NetcleanseError(f"{self.source}: {len(self.x)} images but labels of shape {tuple(self.y.shape)}")
            self.y = self.y.long()
        if self.names is not None and len(self.names) != len(self.x):
            raise NetcleanseError(f"{self.source}: {len(self.x)} images but {len(self.names)} names")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def subset(self, index) -> "Dataset":
        """Rows selected by a slice, a boolean mask or an index tensor."""
        if isinstance(index, slice):
            names = self.names[index] if self.names is not None else None
        else:
            index = torch.as_tensor(index)
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
            names = [self.names[i] for i in index.tolist()] if self.names is not None else None
        return Dataset(self.x[index], None if self.y is None else self.y[index], self.source, names, dict(self.info))
