"""How many images one gradient pass of a scan may hold: its memory bound.

Every search of a scan (the triggers, the margins, the data-free inputs, the transferability) takes
its gradients a group of images at a time. The groups change no number a search computes beyond
the rounding of batched kernels (each image's loss, gradient and Adam step are its own; the
data-free inversion's 30 steps can carry that rounding into the searches, ~0.1 % of a mask's size);
what they bound is the memory of the autograd graph, which holds the activations the backward pass
needs for every image of the group at once. That is about half a MiB per image for the CSAW net or a 32x32
net, and 82 MiB for a ResNet-50 at 224x224, one of whose search steps peaked at 8.8 GiB with 96
images per pass (``benchmarks/pass_memory.py``): more than a laptop or a consumer GPU has.

So a group holds at most a search's own number of images (``cap``: 96 for the trigger, margin and
input searches, :data:`netcleanse.neural_cleanse.MAX_IMAGES`; 256 per-input triggers for the
transferability) and fewer where that many of this model's images would keep more than
``NETCLEANSE_PASS_MIB`` (default 2048) MiB of activations:

    images per pass = min( cap, max(1, floor(budget / b)) ) ,

with ``b`` the bytes of the tensors autograd saves for one image, measured on the scan's own
working copy of the model (one forward pass of two images, parameters and buffers not counted).
The budget is a setting, not the free memory of the moment, so a scan's groups depend on the model
and the setting only; raise it on a large GPU (fewer, larger passes), lower it on a small machine.

Forward passes without a gradient (``predict``, ``eval``, :meth:`Classifier.predict`) keep far
less alive at once than a gradient pass saves, so the same measure bounds them from above: up to
:data:`FORWARD_IMAGES` images per pass, fewer where that many would keep more than the budget
(:func:`forward_batch`; a ResNet-50 at 224x224 then gets 24 images per pass instead of 512).

Training steps (the repairs' fine-tuning and unlearning, the lab) obey the same budget: a
mini-batch whose images would keep more than it takes its gradient in parts (gradient
accumulation, :func:`netcleanse.training.train`), measured in train mode with the weights'
gradients. The mini-batch stays the unit of the optimiser, so the parts change no step beyond
rounding, except through batch-norm layers, which normalise each part by its own statistics.
"""

from __future__ import annotations

import weakref

import torch

from .limits import Limit

PASS_MIB = Limit("NETCLEANSE_PASS_MIB", 2048,
                 "MiB of activations one gradient pass of a scan may keep for its backward pass")
MEASURE_IMAGES = 2  # images of the one measuring forward pass
FORWARD_IMAGES = 512  # the most images of a forward pass without gradient (predict, eval)


def graph_bytes_per_image(model, input_shape, device=None, channels_last: bool = False,
                          training: bool = False) -> int:
    """Bytes of the tensors autograd saves for one image of ``input_shape`` (C, H, W) when the
    gradient is taken with respect to the input (module doc); each storage counted once, the
    model's own parameters and buffers not at all.

    ``training``: measure a training step instead (:func:`netcleanse.training.train`): the model in
    train mode (batch-norm and dropout save what they save there), the gradient taken for the
    weights that require one and not for the input. The model is left as it was: its mode, its
    buffers (batch-norm statistics) and the random number generators (dropout draws)."""
    if training:
        return _training_bytes_per_image(model, input_shape, device, channels_last)
    return _saved_bytes_per_image(model, input_shape, device, channels_last, input_grad=True)


def _saved_bytes_per_image(model, input_shape, device, channels_last: bool, input_grad: bool) -> int:
    device = device or torch.device("cpu")
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.rand(MEASURE_IMAGES, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(input_grad)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return max(1, -(-sum(seen.values()) // MEASURE_IMAGES))


def _training_bytes_per_image(model, input_shape, device, channels_last: bool) -> int:
    was_training = model.training
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = [device] if device is not None and torch.device(device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            model.train()
            return _saved_bytes_per_image(model, input_shape, device, channels_last, input_grad=False)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


def images_per_pass(model, input_shape, device=None, channels_last: bool = False, training: bool = False) -> int:
    """How many images of ``input_shape`` one gradient pass through ``model`` may hold under
    ``NETCLEANSE_PASS_MIB`` (at least 1); each search takes the smaller of this and its own number
    (module doc). ``training``: for a training step (:func:`graph_bytes_per_image`)."""
    per_image = graph_bytes_per_image(model, input_shape, device, channels_last, training=training)
    return max(1, (PASS_MIB() << 20) // per_image)


def forward_batch(model, input_shape, n: int, device=None, batch_size: int | None = None) -> int:
    """Images per forward pass without gradient for ``n`` images: ``batch_size`` when given, else
    at most :data:`FORWARD_IMAGES` and no more than :func:`images_per_pass` allows (module doc;
    measured only when ``n`` exceeds :data:`MEASURE_IMAGES`, so that one or two images cost no
    more than themselves)."""
    if batch_size is not None:
        return batch_size
    if n <= MEASURE_IMAGES:
        return max(1, n)
    # measured once per model, input and device (fine-pruning evaluates its model after every
    # pruned channel: zeroed weights keep the activations' sizes); the budget is read each time
    measured = _FORWARD_BYTES.setdefault(model, {})
    key = (tuple(input_shape), str(device))
    if key not in measured:
        measured[key] = graph_bytes_per_image(model, input_shape, device)
    return min(FORWARD_IMAGES, max(1, (PASS_MIB() << 20) // measured[key]))


_FORWARD_BYTES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {(shape, device): bytes}
