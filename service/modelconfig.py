"""What the control plane reads of a checkpoint's ``config.json`` without loading the model
(no torch): the decoder layer count. The data plane (workers.architectures) takes its
layer-count keys from here."""

from __future__ import annotations

import json
from pathlib import Path

#: config.json keys that hold the decoder layer count, in the order they are tried
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def num_layers(checkpoint: str | None) -> int | None:
    """The decoder layer count of a checkpoint's config.json (its ``text_config`` too, for
    multimodal configs); None when unreadable or not named."""
    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    for source in (config, config.get("text_config") or {}):
        for key in LAYER_COUNT_KEYS:
            if isinstance(source.get(key), int):
                return source[key]
    return None
