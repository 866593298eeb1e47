"""Where the decoder layers are in each model family's tensor names, as data.

Each entry says, for a family of ``model_type`` values: the pattern of a decoder-layer tensor
(one capture group: the layer index), which tensors outside the layers come *before* them
(input embeddings; every other non-layer tensor comes after), which tensors are the output
head (tied to the input embedding when the config says ``tie_word_embeddings``), and which
parts of a layer count as MLP when attention and MLP get ratios of their own (the rest of
the layer, attention and its norm, counts as attention).

Patterns cover the names in checkpoints and the names transformers gives the loaded
modules (they differ for GPT-NeoX: ``embed_out`` on disk, ``lm_head`` in memory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.modelconfig import LAYER_COUNT_KEYS  # noqa: F401  (grouping imports it from here)

#: Norms inside a layer that feed (or follow) the MLP, plus the MLP itself.
_MLP_PARTS = r"(mlp|feed_forward|block_sparse_moe|post_attention_layernorm|ln_2)\."
#: Gemma 2/3 put a norm after attention (post_attention_layernorm) and around the MLP.
_MLP_PARTS_GEMMA2 = r"(mlp|pre_feedforward_layernorm|post_feedforward_layernorm)\."


@dataclass(frozen=True)
class Architecture:
    name: str
    layer: re.Pattern[str]
    before: re.Pattern[str]
    head: re.Pattern[str]
    mlp: re.Pattern[str]


def _arch(name: str, layer: str, before: str, head: str = r"^lm_head\.", mlp: str = _MLP_PARTS):
    return Architecture(name, re.compile(layer), re.compile(before), re.compile(head), re.compile(mlp))


_LLAMA_LIKE = _arch("llama-like", r"^model\.layers\.(\d+)\.", r"^model\.embed_tokens\.")

ARCHITECTURES: dict[str, Architecture] = {
    **{
        mt: _LLAMA_LIKE
        for mt in (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "phi",
            "phi3", "olmo", "olmo2", "granite", "stablelm", "starcoder2", "smollm3",
        )
    },
    **{
        mt: _arch("gemma2-like", r"^model\.layers\.(\d+)\.", r"^model\.embed_tokens\.",
                  mlp=_MLP_PARTS_GEMMA2)
        for mt in ("gemma2", "gemma3_text")
    },
    "gpt2": _arch("gpt2", r"^transformer\.h\.(\d+)\.", r"^transformer\.(wte|wpe)\."),
    "gpt_neox": _arch(
        "gpt_neox", r"^gpt_neox\.layers\.(\d+)\.", r"^gpt_neox\.embed_in\.",
        head=r"^(embed_out|lm_head)\.",
    ),
}

#: Used for a model_type not listed above; grouping fails loudly if it finds no layers.
GENERIC = _arch(
    "generic",
    r"^(?:[\w.]*?\.)?(?:layers|h|blocks|layer)\.(\d+)\.",
    r"(^|\.)(embed_tokens|embed_in|wte|wpe|word_embeddings|embed_positions)\.",
    head=r"^(lm_head|embed_out|output)\.",
)


def architecture_for(model_type: str | None) -> Architecture:
    """The layer patterns for ``model_type`` (the generic patterns when unknown)."""
    return ARCHITECTURES.get(model_type or "", GENERIC)
