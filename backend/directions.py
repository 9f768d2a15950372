"""The directions a LoRA adapter adds: each adapted module's read (A) and write (B) vectors.

For a LoRA module, `lora_A` (r x in) reads r scalars from the module input and `lora_B`
(out x r) writes them back, scaled: delta = scaling * B @ (A @ x). Component c is the pair
(A[c], B[:, c]); its activation on a token is A[c] · x.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from backend import UserError
from backend.contract import module_order, spaces, vector_label, writes_residual

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class LoraModule:
    """One adapted module: where it sits and the vectors its adapter added."""

    name: str  # full module name inside the PEFT model
    layer: int
    module: str  # short name, e.g. "gate_proj"
    A: torch.Tensor  # [r, in]   read vectors, one row per component
    B: torch.Tensor  # [out, r]  write vectors, one column per component
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def layer_prefix(self) -> str:
        return self.name[: self.name.rindex(f".layers.{self.layer}.")] + f".layers.{self.layer}"


def find_lora_modules(model: nn.Module, adapter: str = "default") -> list[LoraModule]:
    """Every LoRA-wrapped linear module of `adapter`, in (layer, module order) order."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if not isinstance(module.lora_A[adapter], nn.Linear):
            raise UserError(f"{name}: only LoRA on linear layers is supported")
        match = _LAYER.search(name)
        if match is None:
            raise UserError(f"{name}: adapted module outside the decoder layers is not supported")
        found.append(
            LoraModule(
                name=name,
                layer=int(match.group(1)),
                module=name.rsplit(".", 1)[1],
                A=module.lora_A[adapter].weight.detach(),
                B=module.lora_B[adapter].weight.detach(),
                scaling=float(module.scaling[adapter]),
            )
        )
    if not found:
        raise UserError(f"the model carries no LoRA modules for adapter {adapter!r}")
    return sorted(found, key=lambda m: (m.layer, module_order(m.module)))


def vectors_by_space(
    modules: list[LoraModule], across_layers: bool = False
) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Every A row and B column, labelled ("gate_proj.A[0]", or "L3.gate_proj.A[0]" across
    layers), grouped by its space."""
    found: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for m in modules:
        read, write = spaces(m.module)
        layer = m.layer if across_layers else None
        for c in range(m.rank):
            found.setdefault(read, []).append((vector_label(m.module, "A", c, layer), m.A[c]))
            found.setdefault(write, []).append((vector_label(m.module, "B", c, layer), m.B[:, c]))
    return found


def cosine_matrix(vectors: list[torch.Tensor]) -> list[list[float]]:
    stacked = torch.stack([v.detach().float().cpu() for v in vectors])  # [n, d]
    unit = stacked / stacked.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).clamp(-1.0, 1.0).tolist()


def layer_cosines(modules: list[LoraModule]) -> list[dict]:
    """Cosine similarities inside each space shared by two or more of a layer's vectors.

    The MLP hidden space (gate.B, up.B, down.A) and the residual stream (gate.A, up.A, down.B)
    come first; attention spaces follow when attention modules are adapted.
    """
    by_space = vectors_by_space(modules)
    names = [s for s in ("mlp_hidden", "residual") if s in by_space]
    names += sorted(s for s in by_space if s not in names and len(by_space[s]) > 1)
    return [
        {
            "space": space,
            "labels": [label for label, _ in by_space[space]],
            "matrix": cosine_matrix([v for _, v in by_space[space]]),
        }
        for space in names
    ]


def cross_layer_cosine(modules: list[LoraModule]) -> dict:
    """Cosines between all vectors in the residual stream, across layers ("L3.gate_proj.A[0]").

    Shows which layers read (A) what earlier layers write (B).
    """
    labelled = [pair for m in modules for pair in vectors_by_space([m], True).get("residual", [])]
    return {
        "labels": [label for label, _ in labelled],
        "matrix": cosine_matrix([v for _, v in labelled]) if labelled else [],
    }


def top_logits(
    unembed: torch.Tensor,  # [V, hidden]
    gain: torch.Tensor,  # [hidden] the final norm's weight
    writes: torch.Tensor,  # [R, hidden] residual-stream write vectors
    n: int,
) -> tuple[torch.return_types.topk, torch.return_types.topk]:
    """The n largest and n smallest logits [R, n] (topk's values and indices) each write
    vector gives, read through the final norm's weight and the unembedding, in its dtype."""
    gain = gain.to(unembed.device, torch.float32)
    scaled = (writes.to(unembed.device, torch.float32) * gain).to(unembed.dtype)  # [R, h]
    logits = (unembed @ scaled.T).float().T  # [R, V]
    return logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)


def readout(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(unembedding [V, hidden], final norm's weight [hidden]) through which a residual-stream
    write is read as logits; None where the model has no final norm with a weight."""
    norm = getattr(model.get_base_model().get_decoder(), "norm", None)
    unembed = model.get_output_embeddings()
    if unembed is None or getattr(norm, "weight", None) is None:
        return None
    return unembed.weight.detach(), norm.weight.detach()


def logit_effects(model: nn.Module, modules: list[LoraModule], n: int) -> dict[str, list[dict]]:
    """For each module writing into the residual stream, per component: the n token ids whose
    logits its write vector B raises most and lowers most, read through the final norm's weight
    and the unembedding, as a feature dashboard shows a feature's output logits.

    (The final norm also divides by the RMS of the whole residual: a positive factor that scales
    every logit alike and so changes no ranking.) Returns {module name: [{"top": [(id, value)],
    "bottom": [...]}, ...]}; empty when the model has no final norm with a weight.
    """
    writers = [m for m in modules if writes_residual(m.module)]
    found = readout(model)
    if not writers or found is None:
        return {}
    weight, gain = found
    b = torch.cat([m.B.detach().to(weight.device, torch.float32) for m in writers], 1)  # [h, R]
    top, bottom = top_logits(weight, gain, b.T, n)
    effects, row = {}, 0
    for m in writers:
        effects[m.name] = [
            {
                side: list(zip(found.indices[r].tolist(), found.values[r].tolist(), strict=True))
                for side, found in (("top", top), ("bottom", bottom))
            }
            for r in range(row, row + m.rank)
        ]
        row += m.rank
    return effects
