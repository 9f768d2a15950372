"""The activations JSON's contract in code: every fact about the format that more than one part
of the project needs (the writer, the dashboard, the page, the tests) lives here once.

The format itself is described field by field in docs/data-format.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 1

# Display and analysis order within a layer: the MLP in data-flow order, then attention in
# q, k, v, o order, then any other adapted module by name.
MODULE_ORDER = ("gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj")

# The space each known module reads from (A) and writes to (B). Cosines are only taken between
# vectors of one space; an unknown module gets spaces of its own.
SPACES = {
    "gate_proj": ("residual", "mlp_hidden"),
    "up_proj": ("residual", "mlp_hidden"),
    "down_proj": ("mlp_hidden", "residual"),
    "q_proj": ("residual", "attn_query"),
    "k_proj": ("residual", "attn_key"),
    "v_proj": ("residual", "attn_value"),
    "o_proj": ("attn_output", "residual"),
}

# The lists of Examples a direction carries, besides those inside its quantile samples.
EXAMPLE_LISTS = ("top_positive", "top_negative")


def module_order(module: str) -> tuple[int, str]:
    """Sort key of a module's short name (e.g. "gate_proj") in MODULE_ORDER."""
    if module in MODULE_ORDER:
        return MODULE_ORDER.index(module), ""
    return len(MODULE_ORDER), module


def spaces(module: str) -> tuple[str, str]:
    """(read space, write space) of a module: where its A rows and its B columns live."""
    return SPACES.get(module, (f"{module}.input", f"{module}.output"))


def writes_residual(module: str) -> bool:
    return spaces(module)[1] == "residual"


def direction_key(layer: int, module: str, component: int) -> str:
    """A direction's name in every file of one adapter (notes, links): "L12.gate_proj[0]"."""
    return f"L{layer}.{module}[{component}]"


def direction_name(module: str, component: int, rank: int) -> str:
    """A direction's name within its layer: "gate_proj", or "gate_proj[1]" where rank > 1."""
    return f"{module}[{component}]" if rank > 1 else module


def vector_label(module: str, side: str, component: int, layer: int | None = None) -> str:
    """A read (side "A") or write ("B") vector: "gate_proj.A[0]", or "L3.gate_proj.A[0]"
    across layers."""
    label = f"{module}.{side}[{component}]"
    return label if layer is None else f"L{layer}.{label}"


@dataclass(frozen=True)
class DirectionRef:
    """One direction of a document, with where it sits."""

    layer: int
    module: str
    projection: dict[str, Any]
    direction: dict[str, Any]

    @property
    def component(self) -> int:
        return self.direction["component"]

    @property
    def key(self) -> str:
        return direction_key(self.layer, self.module, self.component)

    @property
    def name(self) -> str:
        return direction_name(self.module, self.component, self.projection["rank"])


def iter_directions(document: dict[str, Any]) -> Iterator[DirectionRef]:
    """Every direction of the document, by layer, then module in MODULE_ORDER, then component."""
    for layer in document["layers"]:
        modules = sorted(layer["projections"].items(), key=lambda item: module_order(item[0]))
        for module, projection in modules:
            for direction in projection["directions"]:
                yield DirectionRef(layer["layer"], module, projection, direction)


def iter_examples(direction: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every Example a direction carries: its top lists, then its quantile samples."""
    for field in EXAMPLE_LISTS:
        yield from direction[field]
    for samples in direction.get("quantile_samples", []):
        yield from samples["examples"]
