"""What the control plane reads of a checkpoint folder without loading the model (no torch):
its ``config.json`` (the decoder layer count, the architecture, code shipped with it) and the
format of its weights. The data plane (workers.architectures) takes its layer-count keys from
here; the API's admission checks (service/admission.py) the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

#: config.json keys that hold the decoder layer count, in the order they are tried
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
#: files of a folder whose ``auto_map`` names Python code shipped with the checkpoint
CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json",
                "preprocessor_config.json")


def read_config(checkpoint: str | Path | None, name: str = "config.json") -> dict | None:
    """The JSON object in ``checkpoint``/``name``; None when missing, unreadable or not an
    object."""
    try:
        config = json.loads((Path(checkpoint) / name).read_text())
    except (OSError, ValueError, TypeError):
        return None
    return config if isinstance(config, dict) else None


def num_layers(checkpoint: str | None) -> int | None:
    """The decoder layer count of a checkpoint's config.json (its ``text_config`` too, for
    multimodal configs); None when unreadable or not named."""
    config = read_config(checkpoint)
    if config is None:
        return None
    text_config = config.get("text_config")
    for source in (config, text_config if isinstance(text_config, dict) else {}):
        for key in LAYER_COUNT_KEYS:
            if isinstance(source.get(key), int) and not isinstance(source.get(key), bool):
                return source[key]
    return None


def remote_code(checkpoint: str | Path) -> list[str]:
    """The files of ``checkpoint`` whose ``auto_map`` makes transformers import Python code
    from the checkpoint (``trust_remote_code``); empty when there is none."""
    return [name for name in CODE_CONFIGS
            if (config := read_config(checkpoint, name)) is not None and config.get("auto_map")]


def weight_format(checkpoint: str | Path) -> str | None:
    """``safetensors``, ``pickle`` (only ``pytorch_model*.bin`` weights) or None (no weights
    found), by the file names the loader (workers/checkpoint.py) looks for."""
    folder = Path(checkpoint)
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return "safetensors"
    if any(folder.glob("pytorch_model*.bin")) or (folder / "pytorch_model.bin.index.json").is_file():
        return "pickle"
    return None
