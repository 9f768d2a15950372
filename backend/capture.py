"""Forward hooks that compute every direction's activation inside the model's own forward pass.

Modules that read the same tensor share a read site: gate_proj and up_proj both read the
post_attention_layernorm output, so one matmul with their stacked A rows serves both. Each
site's activations land in a row slice of one [D, B*L] buffer per batch, D = all directions:
direction-major, so that the tracker's per-direction reductions read contiguous memory.
The baseline neurons (backend.neurons) are extra rows of the down_proj input's site, a site of
their own where down_proj is not adapted; their rows follow every LoRA direction's, so a LoRA
direction has the same row with or without them.
Once the last site of the pass has fired, the hook raises `StopForward`: nothing after the last
adapted layer (later layers, final norm, lm_head) is computed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import torch
from torch import nn

from backend.directions import LoraModule
from backend.neurons import SITE, NeuronSite

# Modules whose input is the output of a sibling norm of the decoder layer (Llama, Qwen2,
# Mistral, ...), so they can share one read site. Others read their own input.
SHARED_INPUTS = {
    "gate_proj": "post_attention_layernorm",
    "up_proj": "post_attention_layernorm",
    "q_proj": "input_layernorm",
    "k_proj": "input_layernorm",
    "v_proj": "input_layernorm",
}


class StopForward(Exception):
    """Raised by the last hook of a pass: the rest of the forward is not needed."""


@dataclass
class ReadSite:
    """One tensor that one or more adapted modules read, and the directions read from it."""

    path: str  # module to hook
    label: str  # e.g. "post_attention_layernorm.output", "down_proj.input"
    reads_output: bool  # hook the module's output (a norm) or its input (the adapted module)
    layer: int
    modules: list[LoraModule] = field(default_factory=list)
    rows: slice = field(default_factory=lambda: slice(0))  # its directions in the [D, B*L] buffer
    neurons: list[int] = field(default_factory=list)  # baseline neurons: coordinates it reads
    neuron_rows: slice = field(default_factory=lambda: slice(0))  # theirs in the buffer

    def weight(self) -> torch.Tensor | None:
        if not self.modules:
            return None
        return torch.cat([m.A for m in self.modules])  # [directions, in]


def read_sites(
    model: nn.Module, modules: list[LoraModule], neurons: Sequence[NeuronSite] = ()
) -> list[ReadSite]:
    """Group modules by the tensor they read, keeping `modules` order within each site, and
    give each layer's neurons to its down_proj input's site; sites in layer order."""
    sites: dict[str, ReadSite] = {}
    for m in modules:
        norm = SHARED_INPUTS.get(m.module)
        norm_path = f"{m.layer_prefix}.{norm}"
        if norm is not None and _has_module(model, norm_path):
            site = sites.setdefault(norm_path, ReadSite(norm_path, f"{norm}.output", True, m.layer))
        else:
            site = sites.setdefault(m.name, ReadSite(m.name, f"{m.module}.input", False, m.layer))
        site.modules.append(m)
    for n in neurons:
        site = sites.setdefault(n.path, ReadSite(n.path, f"{SITE}.input", False, n.layer))
        site.neurons = n.neurons
    return sorted(sites.values(), key=lambda site: site.layer)  # stable: modules order kept


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


class ActivationCapture:
    """Fills `self.buffer` ([D, B*L], float32, on `device`) during one forward pass."""

    def __init__(self, model: nn.Module, sites: list[ReadSite], device: torch.device) -> None:
        self.model = model
        self.sites = sites
        self.device = device
        start = 0
        for site in sites:
            site.rows = slice(start, start + sum(m.rank for m in site.modules))
            start = site.rows.stop
        self.num_lora = start  # the LoRA directions, then the neurons
        for site in sites:
            site.neuron_rows = slice(start, start + len(site.neurons))
            start = site.neuron_rows.stop
        self.num_directions = start
        self.weights = [site.weight() for site in sites]
        self.neurons = [torch.tensor(site.neurons, dtype=torch.long) for site in sites]
        self.buffer = torch.empty(0)
        self._fired = 0

    def neuron_layout(self) -> list[dict[str, int]]:
        """Each baseline neuron's layer, coordinate and row, in (layer, neuron) order."""
        return [
            {"layer": site.layer, "neuron": neuron, "index": site.neuron_rows.start + j}
            for site in self.sites
            for j, neuron in enumerate(site.neurons)
        ]

    def _hook(self, index: int):
        site, weight, neurons = self.sites[index], self.weights[index], self.neurons[index]

        def compute(x: torch.Tensor) -> None:
            nonlocal neurons
            x = x.reshape(-1, x.shape[-1])  # [B*L, in]
            if weight is not None:
                # Cast as PEFT does before lora_A, so the values equal lora_A's output.
                acts = torch.mm(weight, x.to(weight.dtype).T)  # [d_site, B*L]
                self.buffer[site.rows] = acts.to(self.device, torch.float32)
            if len(neurons):  # A = a unit vector: the coordinate itself, exactly
                if neurons.device != x.device:  # once: the device of the site's module
                    neurons = neurons.to(x.device)
                picked = x.index_select(1, neurons).T  # [n_site, B*L]
                self.buffer[site.neuron_rows] = picked.to(self.device, torch.float32)
            self._fired += 1
            if self._fired == len(self.sites):
                raise StopForward

        if site.reads_output:
            return lambda module, args, output: compute(output)
        return lambda module, args: compute(args[0])

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """Hooks in place for the duration of the block, removed however it ends."""
        handles = []
        try:
            for i, site in enumerate(self.sites):
                module = self.model.get_submodule(site.path)
                if site.reads_output:
                    handles.append(module.register_forward_hook(self._hook(i)))
                else:
                    handles.append(module.register_forward_pre_hook(self._hook(i)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Activations of every direction at every position: [D, B*L]; padding is garbage."""
        self.buffer = torch.empty(self.num_directions, input_ids.numel(), device=self.device)
        self._fired = 0
        with suppress(StopForward):
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if self._fired != len(self.sites):
            raise RuntimeError(f"only {self._fired} of {len(self.sites)} read sites fired")
        return self.buffer
