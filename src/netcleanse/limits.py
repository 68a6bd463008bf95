"""The size limits netcleanse applies to untrusted files, each a setting.

Every limit is checked on what a file *declares* (an array's shape, a zip member's size, a Keras
layer's units or input shape), before anything is allocated, so that a small file cannot make
netcleanse use gigabytes. Each is read from its environment variable when it is checked (so a
limit can be raised for one command: ``NETCLEANSE_MAX_LAYER_WEIGHTS=1000000000 netcleanse scan ...``)
and falls back to its default. A value that is not a positive whole number is an error.

==================================  ==============  =================================================
variable                            default         what it bounds
==================================  ==============  =================================================
``NETCLEANSE_MAX_IMAGE_PIXELS``     16,000,000      width x height of one image file (PNG/JPEG)
``NETCLEANSE_MAX_INPUT_VALUES``     48,000,000      values per image a Keras input layer declares
``NETCLEANSE_MAX_LAYER_WEIGHTS``    2^28            weights one Keras layer declares (Dense, Conv2D,
                                                    DepthwiseConv2D, Normalization)
``NETCLEANSE_MAX_EXPANSION``        200             declared bytes of an array / the bytes its file
                                                    stores (HDF5 datasets, .npz members, zip members)
``NETCLEANSE_SMALL_ARRAY_BYTES``    64 MiB          arrays up to this size are exempt from the
                                                    expansion check
``NETCLEANSE_MAX_CONFIG_BYTES``     64 MiB          ``config.json``/``metadata.json`` of a .keras
``NETCLEANSE_MAX_WEIGHTS_BYTES``    8 GiB           ``model.weights.h5`` of a .keras archive
``NETCLEANSE_MAX_ARCHIVE_MEMBERS``  100,000         members of a .keras archive
``NETCLEANSE_MAX_CHUNKS``           2^20            chunks of one HDF5 dataset (stored or not)
==================================  ==============  =================================================

Not settings: an ONNX file is at most 2 GiB (protobuf's own limit for one message); how deeply
a model description may nest is bounded by Python's recursion limit (a file nested deeper is
refused, never a traceback); a label list (``--labels``) is bounded by the model's classes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import NetcleanseError


@dataclass(frozen=True)
class Limit:
    """One limit: calling it returns the value in force (the environment variable, else the default)."""

    env: str
    default: int
    what: str

    def __call__(self) -> int:
        raw = os.environ.get(self.env, "").strip()
        if not raw:
            return self.default
        try:
            value = int(raw)
        except ValueError:
            raise NetcleanseError(f"{self.env} must be a whole number (got {raw!r})") from None
        if value <= 0:
            raise NetcleanseError(f"{self.env} must be positive (got {value})")
        return value

    @property
    def hint(self) -> str:
        """What to say after a refusal: how to raise the limit."""
        return f"set {self.env} to change"


IMAGE_PIXELS = Limit("NETCLEANSE_MAX_IMAGE_PIXELS", 16_000_000, "width x height of one image file")
INPUT_VALUES = Limit("NETCLEANSE_MAX_INPUT_VALUES", 48_000_000,
                     "values per image a Keras input layer may declare (16 megapixels x 3 channels)")
LAYER_WEIGHTS = Limit("NETCLEANSE_MAX_LAYER_WEIGHTS", 1 << 28,
                      "weights one Keras layer may declare (1 GiB of float32; VGG-16's largest layer has 1.03e8)")
EXPANSION = Limit("NETCLEANSE_MAX_EXPANSION", 200,
                  "how many times more bytes an array may declare than its file stores (compression)")
SMALL_ARRAY_BYTES = Limit("NETCLEANSE_SMALL_ARRAY_BYTES", 64 << 20,
                          "arrays up to this many bytes are exempt from the expansion check")
CONFIG_BYTES = Limit("NETCLEANSE_MAX_CONFIG_BYTES", 64 << 20,
                     "bytes of a .keras archive's config.json or metadata.json")
WEIGHTS_BYTES = Limit("NETCLEANSE_MAX_WEIGHTS_BYTES", 8 << 30, "bytes of a .keras archive's model.weights.h5")
ARCHIVE_MEMBERS = Limit("NETCLEANSE_MAX_ARCHIVE_MEMBERS", 100_000, "members of a .keras archive")
CHUNKS = Limit("NETCLEANSE_MAX_CHUNKS", 1 << 20,
               "chunks one HDF5 dataset may be split into (HDF5 visits each; a million take seconds)")

ALL = (IMAGE_PIXELS, INPUT_VALUES, LAYER_WEIGHTS, EXPANSION, SMALL_ARRAY_BYTES, CONFIG_BYTES, WEIGHTS_BYTES,
       ARCHIVE_MEMBERS, CHUNKS)
