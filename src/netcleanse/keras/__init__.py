"""Keras ``.h5`` files into PyTorch and back, without TensorFlow.

Three kinds of Keras file are read:

- **Whole-model files** (root attribute ``model_config``, weights under ``model_weights``): the
  JSON config is parsed and an equivalent torch graph, :class:`KerasGraph`, is built from it.
  Sequential and Functional ("Model") configs of Keras 2.x, tf-keras and Keras 3 (dict-form
  ``inbound_nodes``) are understood, nested models included. Only the layer types listed in
  :data:`SUPPORTED_LAYERS` are built (tf.keras ``TFOpLambda`` and ``SlicingOpLambda`` layers only for the TensorFlow
  operations named in :data:`~.builders.TF_OPS`); a ``Lambda`` layer (serialized Python bytecode),
  any other TensorFlow operation, a custom or unknown layer class is refused with an error naming
  the layer. Nothing from the file is
  ever executed: the config is read as JSON data and mapped onto torch code written here.
- **Weights-only files** (root attribute ``layer_names``, one group per layer, as written by
  Keras ``save_weights``): loaded into a registered architecture (``arch``) whose submodules
  carry the Keras layer names. Given ``arch``, a whole-model file is loaded this way too: its
  ``model_config`` is then ignored and only its weights are used.
- **Keras 3 ``.keras`` archives** (a zip holding ``config.json``, ``metadata.json`` and
  ``model.weights.h5``): the config is rebuilt as above; the weights file's layout is Keras 3's
  (``layers/<snake_case class name>[_<n>]/vars/<i>``, nested models below their own
  ``layers/``), read by :func:`load_keras_archive`. The archive is read in memory, never
  extracted, with the size limits of :func:`netcleanse.utils.check_declared_size`; an HDF5 file
  inside it that refers to other files is refused, as for ``.h5``.

Layout: inside netcleanse image tensors are NCHW; Keras computes NHWC. Every layer here keeps
Keras semantics under that change: ``Flatten`` flattens in Keras's (H, W, C) order so Dense
kernels apply unchanged, ``Concatenate``/``Softmax``/``BatchNormalization`` axes given in Keras
(channels-last) terms are mapped to NCHW. Tensors of rank other than 4 keep Keras's layout.
Keras stores conv kernels HWIO and dense kernels (in, out); torch wants OIHW and (out, in).

Output contract: the module returns **logits**. When the network ends in a softmax (a final
Dense/Conv2D with ``activation="softmax"``, an ``Activation("softmax")`` or a ``Softmax`` layer,
also inside a nested final model) that softmax is left out, so ``softmax(module(x))`` equals
Keras's output. A final sigmoid or tanh (one squashed score per class) is left out the same way,
the logits being the scores before it (same argmax; ``softmax(module(x))`` is then not Keras's
output). Any other output is returned as it is (:attr:`KerasGraph.final_activation` says what
the network ends in).

Export: :func:`save_keras_weights` writes a Keras-compatible ``.h5`` with the same layer and
dataset names (``<layer>/<layer>/kernel:0``, ``bias:0``, BatchNormalization ``gamma``, ``beta``,
``moving_mean``, ``moving_variance``), so a repaired model can go back to a Keras user.

The package, one concept per module, from the bottom: :mod:`.hdf5` (reading a Keras ``.h5``:
list attributes, layer groups, ``model_config``), :mod:`.layers` (torch layers with Keras
semantics, activations), :mod:`.slots` (where each Keras weight of a torch module lives and how
it converts), :mod:`.builders` (the registry of layer builders: Keras class name -> torch module),
:mod:`.config` (reading a config, refusing Lambda and custom layers), :mod:`.graph`
(:class:`KerasGraph`), :mod:`.weights` (Keras 2 and Keras 3 weight layouts into a net),
:mod:`.load` (``.h5`` files), :mod:`.archive` (``.keras`` archives), :mod:`.export` (writing ``.h5``).
"""

from __future__ import annotations

from .archive import MAX_ARCHIVE_MEMBERS, MAX_CONFIG_BYTES, MAX_WEIGHTS_BYTES, load_keras_archive
from .builders import BUILDERS, MAX_LAYER_WEIGHTS, MODEL_CLASSES, SUPPORTED_LAYERS, LayerCall, build_layer, builds
from .config import MAX_INPUT_VALUES, check_config
from .export import EXPORT_KERAS_VERSION, keras_layer_weights, save_keras_weights
from .graph import KerasGraph, graph_from_config
from .layers import (KerasActivation, KerasBatchNorm, KerasConv2d, KerasCropping2d, KerasDense, KerasDepthwiseConv2d,
                     KerasFlatten, KerasGlobalPool2d, KerasLayerNorm, KerasLayerScale, KerasMerge, KerasNormalization,
                     KerasPermute, KerasPool2d, KerasPReLU, KerasReshape, KerasRescaling, KerasResizing,
                     KerasSeparableConv2d, KerasSlice, KerasUpSampling2d)
from .load import load_keras
from .weights import _snake_case, keras_weights_to_module  # noqa: F401 (_snake_case: for the tests)

__all__ = ["BUILDERS", "EXPORT_KERAS_VERSION", "KerasActivation", "KerasBatchNorm", "KerasConv2d", "KerasCropping2d",
           "KerasDense", "KerasDepthwiseConv2d", "KerasFlatten", "KerasGlobalPool2d", "KerasGraph", "KerasLayerNorm",
           "KerasLayerScale", "KerasMerge", "KerasNormalization", "KerasPermute", "KerasPool2d", "KerasPReLU",
           "KerasReshape", "KerasRescaling", "KerasResizing", "KerasSeparableConv2d", "KerasSlice", "KerasUpSampling2d", "LayerCall", "MAX_ARCHIVE_MEMBERS",
           "MAX_CONFIG_BYTES", "MAX_INPUT_VALUES", "MAX_LAYER_WEIGHTS", "MAX_WEIGHTS_BYTES", "MODEL_CLASSES",
           "SUPPORTED_LAYERS", "build_layer", "builds", "check_config", "graph_from_config", "keras_layer_weights",
           "keras_weights_to_module", "load_keras", "load_keras_archive", "save_keras_weights"]
