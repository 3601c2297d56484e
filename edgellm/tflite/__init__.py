# SPDX-License-Identifier: MIT
"""The TFLite/LiteRT backend (``pip install edgellm[tflite]``): export and run ``.tflite`` models.

- ``edgellm.tflite.export.export_tflite(gguf, out, quantize="int8")`` writes a ``.tflite``
  file with ``prefill`` and ``decode`` signatures (needs torch, litert-torch and
  ai-edge-quantizer; a hub-side step of ``edgellm build --board coral-dev-board``).
- ``edgellm.Model(path)`` on a ``.tflite`` file or a tflite bundle runs it through
  ``edgellm.tflite.runtime`` (needs ai-edge-litert, or tflite-runtime >= 2.15).

Nothing here is imported by the native runtime: a board with the native backend never
loads these modules or their packages.
"""

from __future__ import annotations

TFLITE_NAME = "model.tflite"  # the .tflite file's name inside a bundle
