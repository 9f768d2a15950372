"""The neuron baseline (--baseline-neurons N): N seeded coordinates of the MLP hidden space of
every adapted layer, read at the down_proj input of the adapted model in the same pass.

A neuron is a direction with A = a unit vector: the capture reads its coordinate of the
down_proj input (backend.capture) and the tracker keeps every summary of it, after the LoRA
directions. It has no write vector, so no logit effects, cosines or siblings, and nothing
ever ablates it (the effects see the LoRA directions only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from backend import OptionError, UserError
from backend.directions import LoraModule

SEED = 13  # with the layer number: the same neurons for every split and rerun of a run
SITE = "down_proj"  # the module whose input they are read from


@dataclass(frozen=True)
class NeuronSite:
    """The neurons of one layer: where they are read, and which coordinates (sorted)."""

    layer: int
    path: str  # the layer's down_proj module, whose input holds them
    neurons: list[int]


def choose(hidden: int, n: int, layer: int) -> list[int]:
    """n distinct coordinates of [0, hidden), sorted, seeded by SEED and the layer."""
    generator = torch.Generator().manual_seed(SEED * 100_003 + layer)
    return sorted(torch.randperm(hidden, generator=generator)[:n].tolist())


def neuron_sites(model: nn.Module, modules: list[LoraModule], n: int) -> list[NeuronSite]:
    """n neurons of every adapted layer, in layer order ([] where n is 0)."""
    if n == 0:
        return []
    prefixes = {m.layer: m.layer_prefix for m in modules}
    sites = []
    for layer, prefix in sorted(prefixes.items()):
        path = f"{prefix}.mlp.{SITE}"
        try:
            down = model.get_submodule(path)
        except AttributeError:
            raise UserError(f"--baseline-neurons: layer {layer} has no mlp.{SITE}") from None
        hidden = down.in_features
        if n > hidden:
            raise OptionError(
                f"--baseline-neurons {n}: the MLP of layer {layer} has only {hidden} neurons"
            )
        sites.append(NeuronSite(layer, path, choose(hidden, n, layer)))
    return sites
