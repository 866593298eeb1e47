"""Job-spec schemas shared by the CLI, the REST API and the workers.

Ratio convention, everywhere in hmaopt: a ratio is the weight on the ALIGNED model,
``merged = base + ratio * (aligned - base)`` (``torch.lerp(base, aligned, ratio)``);
ratio 0 is the base (pre-RLHF) model, ratio 1 the aligned (post-RLHF) one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import SpecError

Scheme = Literal["uniform", "blocks", "layers", "custom"]
NonLayerRule = Literal["nearest", "mean", "base", "aligned", "own"]

#: The paper's default number of blocks for ``scheme: blocks``.
DEFAULT_BLOCKS = 3


class GroupSpec(BaseModel):
    """How decoder layers are grouped; each group gets one ratio (two with ``split_attn_mlp``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: Scheme = Field("blocks", description="uniform | blocks | layers | custom")
    k: int | None = Field(
        None, ge=1, description="Number of contiguous blocks (scheme blocks; default 3)."
    )
    boundaries: tuple[int, ...] | None = Field(
        None,
        description="scheme custom: the first decoder layer of every group after the first, "
        "strictly increasing, e.g. [8, 17] splits 26 layers into 0-7, 8-16, 17-25.",
    )
    split_attn_mlp: bool = Field(
        False,
        description="Give the attention and the MLP tensors of each group a ratio of their own.",
    )
    non_layer: NonLayerRule = Field(
        "nearest",
        description="Ratio of tensors outside the decoder layers: nearest (embeddings with the "
        "first group, final norm and head with the last), mean (mean of the ratios), base (0), "
        "aligned (1), own (one extra ratio, last in the vector).",
    )

    @model_validator(mode="after")
    def _check_scheme_fields(self) -> GroupSpec:
        if self.scheme == "blocks":
            if self.boundaries is not None:
                raise ValueError("boundaries is only for scheme custom")
        elif self.scheme == "custom":
            if not self.boundaries:
                raise ValueError("scheme custom needs boundaries, e.g. [8, 17]")
            if self.k is not None:
                raise ValueError("k is only for scheme blocks")
            if any(b <= a for a, b in zip(self.boundaries, self.boundaries[1:])):
                raise ValueError(f"boundaries must be strictly increasing, got {list(self.boundaries)}")
            if self.boundaries[0] <= 0:
                raise ValueError("boundaries must be > 0 (group 0 always starts at layer 0)")
        elif self.k is not None or self.boundaries is not None:
            raise ValueError(f"scheme {self.scheme} takes neither k nor boundaries")
        return self

    @property
    def blocks(self) -> int:
        return self.k if self.k is not None else DEFAULT_BLOCKS

    def describe(self) -> str:
        """Short text form, the inverse of :func:`parse_groups_arg`."""
        if self.scheme == "blocks":
            return f"blocks:{self.blocks}"
        if self.scheme == "custom":
            return "custom:" + ",".join(map(str, self.boundaries or ()))
        return self.scheme

    @classmethod
    def parse_arg(
        cls, text: str, *, split_attn_mlp: bool = False, non_layer: NonLayerRule = "nearest"
    ) -> GroupSpec:
        """Parse the CLI form: ``uniform``, ``layers``, ``blocks[:K]``, ``custom:B1,B2,...``."""
        scheme, _, arg = text.strip().partition(":")
        fields: dict[str, object] = {
            "scheme": scheme,
            "split_attn_mlp": split_attn_mlp,
            "non_layer": non_layer,
        }
        try:
            if scheme == "blocks" and arg:
                fields["k"] = int(arg)
            elif scheme == "custom":
                fields["boundaries"] = tuple(int(b) for b in arg.split(",") if b.strip())
            elif arg:
                raise SpecError(f"scheme {scheme!r} takes no ':' argument", field="groups")
        except ValueError as exc:
            raise SpecError(
                f"cannot read {text!r}: use uniform, layers, blocks:K or custom:B1,B2,...",
                field="groups",
            ) from exc
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise spec_error_from_validation(exc, prefix="groups") from exc


def spec_error_from_validation(exc: ValidationError, *, prefix: str = "") -> SpecError:
    """Turn a pydantic ValidationError into a SpecError naming the first offending field."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    field = ".".join(p for p in (prefix, loc) if p) or None
    msg = err.get("msg", str(exc)).removeprefix("Value error, ")
    if "input" in err and err.get("type") in ("literal_error", "enum"):
        msg = f"{msg} (got {err['input']!r})"
    return SpecError(msg, field=field)
