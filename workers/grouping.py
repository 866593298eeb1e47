"""Layer grouping: which ratio each tensor takes.

A :class:`Grouping` maps every tensor name of a model to one *slot* of the ratio vector
(or to a rule for tensors outside the decoder layers). Slots, in order:

- one per group (``all`` for uniform, ``block0..`` for blocks/custom, ``layer0..`` for layers);
- with ``split_attn_mlp`` two per group: ``<group>.attn`` then ``<group>.mlp``;
- with ``non_layer: own`` one last slot, ``non_layer``.

Tensors outside the decoder layers follow ``GroupSpec.non_layer``:

- ``nearest`` (default): input embeddings take the first slot (the first group's attention
  ratio when split); the final norm and the output head take the last group's slot (its MLP
  ratio when split). A tied output head is the input embedding: one tensor, the first slot.
- ``mean``: the mean of the group ratios; ``base``: 0; ``aligned``: 1; ``own``: its own slot.

With ``scheme: uniform`` and the default rule every tensor takes the one ratio: vanilla model
averaging. Ratios are weights on the ALIGNED model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from service.errors import CheckpointError, RatioError, SpecError
from service.spec import GroupSpec
from workers.architectures import LAYER_COUNT_KEYS, Architecture, architecture_for

# How a tensor's ratio is found: ("slot", i), ("mean", None) or ("const", value).
Rule = tuple[str, float | int | None]


@dataclass(frozen=True)
class Group:
    name: str
    layers: tuple[int, ...]


@dataclass(frozen=True)
class Grouping:
    spec: GroupSpec
    num_layers: int
    groups: tuple[Group, ...]
    slots: tuple[str, ...]
    rules: Mapping[str, Rule]
    non_layer: tuple[str, ...]  # tensor names outside the decoder layers
    tied: bool

    @property
    def n_ratios(self) -> int:
        return len(self.slots)

    def check_ratios(
        self,
        ratios: Sequence[float],
        *,
        bounds: tuple[float, float] = (0.0, 1.0),
        allow_extrapolation: bool = False,
    ) -> tuple[float, ...]:
        """Validate a ratio vector (count, finiteness, bounds) and return it as floats."""
        if len(ratios) != self.n_ratios:
            raise RatioError(
                f"groups {self.spec.describe()}"
                + (" with split_attn_mlp" if self.spec.split_attn_mlp else "")
                + (" and non_layer own" if self.spec.non_layer == "own" else "")
                + f" on {self.num_layers} layers takes {self.n_ratios} ratio(s) "
                f"({', '.join(self.slots)}), got {len(ratios)}",
                field="ratios",
            )
        out = tuple(float(r) for r in ratios)
        lo, hi = bounds
        for slot, r in zip(self.slots, out):
            if not math.isfinite(r):
                raise RatioError(f"ratio for {slot} is {r}", field="ratios")
            if not allow_extrapolation and not lo <= r <= hi:
                raise RatioError(
                    f"ratio for {slot} is {r}, outside [{lo}, {hi}] (a ratio is the weight on "
                    "the aligned model; allow extrapolation explicitly to go beyond)",
                    field="ratios",
                )
        return out

    def ratio_of(self, name: str, ratios: Sequence[float]) -> float:
        """The ratio tensor ``name`` takes under the (already checked) ratio vector."""
        kind, value = self.rules[name]
        if kind == "slot":
            return float(ratios[int(value)])  # type: ignore[arg-type]
        if kind == "mean":
            group_slots = len(self.slots) - (1 if self.spec.non_layer == "own" else 0)
            return float(sum(ratios[:group_slots]) / group_slots)
        return float(value)  # type: ignore[arg-type]

    def describe(self, ratios: Sequence[float] | None = None) -> dict:
        """JSON-ready description (for manifests and reports)."""
        out: dict = {
            "scheme": self.spec.scheme,
            "spec": self.spec.model_dump(mode="json"),
            "num_layers": self.num_layers,
            "groups": [{"name": g.name, "layers": list(g.layers)} for g in self.groups],
            "slots": list(self.slots),
            "non_layer_rule": self.spec.non_layer,
            "tied_embeddings": self.tied,
        }
        if ratios is not None:
            out["ratios"] = dict(zip(self.slots, ratios))
            out["non_layer_tensors"] = {n: self.ratio_of(n, ratios) for n in self.non_layer}
        return out


def num_layers_of(config: Mapping) -> int:
    """The number of decoder layers from a model config (dict form of config.json)."""
    for source in (config, config.get("text_config") or {}):
        for key in LAYER_COUNT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    raise CheckpointError(
        f"the model config names no layer count (looked for {', '.join(LAYER_COUNT_KEYS)})"
    )


def layer_groups(spec: GroupSpec, num_layers: int) -> tuple[Group, ...]:
    """Split layers 0..num_layers-1 into the spec's contiguous groups."""
    if spec.scheme == "uniform":
        return (Group("all", tuple(range(num_layers))),)
    if spec.scheme == "layers":
        return tuple(Group(f"layer{i}", (i,)) for i in range(num_layers))
    if spec.scheme == "blocks":
        k = spec.blocks
        if k > num_layers:
            raise SpecError(f"k={k} blocks but the model has {num_layers} layers", field="groups.k")
        size, extra = divmod(num_layers, k)
        # The paper's split: the later blocks take the extra layers (26 -> 8, 9, 9).
        sizes = [size + (1 if i >= k - extra else 0) for i in range(k)]
        starts = [sum(sizes[:i]) for i in range(k)]
        return tuple(
            Group(f"block{i}", tuple(range(s, s + n))) for i, (s, n) in enumerate(zip(starts, sizes))
        )
    bounds = list(spec.boundaries or ())
    if bounds[-1] >= num_layers:
        raise SpecError(
            f"boundary {bounds[-1]} is not inside the model's {num_layers} layers",
            field="groups.boundaries",
        )
    edges = [0, *bounds, num_layers]
    return tuple(Group(f"block{i}", tuple(range(a, b))) for i, (a, b) in enumerate(zip(edges, edges[1:])))


def build_grouping(config: Mapping, tensor_names: Iterable[str], spec: GroupSpec) -> Grouping:
    """Assign every tensor in ``tensor_names`` a rule, for the model described by ``config``."""
    arch = architecture_for(config.get("model_type"))
    num_layers = num_layers_of(config)
    groups = layer_groups(spec, num_layers)
    per_group = 2 if spec.split_attn_mlp else 1
    slots = [
        f"{g.name}.{part}" if spec.split_attn_mlp else g.name
        for g in groups
        for part in (("attn", "mlp") if spec.split_attn_mlp else ("",))
    ]
    if spec.non_layer == "own":
        slots.append("non_layer")
    group_of_layer = {layer: i for i, g in enumerate(groups) for layer in g.layers}
    tied = bool(config.get("tie_word_embeddings", (config.get("text_config") or {}).get(
        "tie_word_embeddings", False)))

    rules: dict[str, Rule] = {}
    non_layer: list[str] = []
    seen_layers: set[int] = set()
    for name in tensor_names:
        m = arch.layer.match(name)
        if m:
            layer = int(m.group(1))
            if layer >= num_layers:
                raise CheckpointError(
                    f"tensor {name} is in layer {layer} but the config says {num_layers} layers"
                )
            seen_layers.add(layer)
            slot = group_of_layer[layer] * per_group
            if spec.split_attn_mlp and arch.mlp.match(name[m.end():]):
                slot += 1
            rules[name] = ("slot", slot)
        else:
            non_layer.append(name)
            rules[name] = _non_layer_rule(name, arch, spec, tied, len(slots))
    missing = sorted(set(range(num_layers)) - seen_layers)
    if missing:
        raise CheckpointError(
            f"no tensors found for decoder layer(s) {missing[:8]} of a {num_layers}-layer "
            f"{config.get('model_type')!r} model (layer pattern {arch.layer.pattern!r}); "
            "the config and the weights disagree, or this architecture is not supported yet"
        )
    return Grouping(spec, num_layers, groups, tuple(slots), rules, tuple(non_layer), tied)


def _non_layer_rule(name: str, arch: Architecture, spec: GroupSpec, tied: bool, n_slots: int) -> Rule:
    rule = spec.non_layer
    if rule == "base":
        return ("const", 0.0)
    if rule == "aligned":
        return ("const", 1.0)
    if rule == "mean":
        return ("mean", None)
    if rule == "own":
        return ("slot", n_slots - 1)
    # nearest: before the layers -> first slot; after -> the last group's last slot.
    # A tied output head is the input embedding, so it goes with the first slot too.
    if arch.before.search(name) or (tied and arch.head.match(name)):
        return ("slot", 0)
    return ("slot", n_slots - 1)
