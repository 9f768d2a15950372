"""Causal effects of the LoRA directions on one row: KL to the base model, leave-one-out and
group ablations, and gradient x activation attribution, exactly and at a fraction of the cost
of one full forward per ablation.

Ablating a set of directions removes each one's whole write `scaling * B[:, c] * a_c` at every
position, every other direction on: the same as zeroing those `lora_B` columns. An ablation
whose first ablated module sits in layer l changes nothing before layer l, so it starts from
the full run's input to layer l (captured once, with the keyword arguments the model passed:
attention mask, position embeddings) and runs only the model's own decoder layers from l on,
then the final norm and the unembedding. Ablations that start at the same layer run as one
batch: batch element i zeroes its own columns through a keep-mask on each `lora_B` input.

KL and cross-entropy are float64 (logits cast before log_softmax), over the positions
t = 0 .. n-2, each predicting token t + 1. Logits are taken a chunk of positions at a time, so
that what a batch holds stays bounded whatever the vocabulary; the full model's distribution,
which every ablation is compared with, is kept once per row as float32 [n-1, V] (as large as
the logits of one plain forward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backend.contract import module_order
from backend.directions import LoraModule

# float64 logits of one chunk: [ablations, positions, vocab] elements (128 MiB).
LOGIT_ELEMENTS = 2**24


@dataclass
class RowEffects:
    """One row of n tokens; every sum is float64 over its n - 1 positions (t predicts t + 1)."""

    kl_tokens: torch.Tensor  # [n-1] float64: KL(p_adapted || p_base) at each position
    ablation_kl: torch.Tensor  # [D] float64: sum over positions of KL(p_full || p_ablated)
    ablation_dloss: torch.Tensor  # [D] float64: sum over positions of CE_ablated - CE_full
    layer_kl: torch.Tensor  # [num_layers] float64: all directions of a layer at once
    layer_dloss: torch.Tensor
    module_kl: torch.Tensor  # [num_modules] float64: one module name across all layers
    module_dloss: torch.Tensor
    activations: torch.Tensor  # [D, n] float32: each direction's lora_A output
    attribution: torch.Tensor  # [D, n] float32: -a_t * dL/da_t, L = summed CE of the row


@dataclass
class Ablation:
    """One set of directions removed at once, and where its two sums go."""

    start: int  # the first layer it changes
    drop: dict[str, list[int]]  # module name -> components whose lora_B columns are zeroed
    kind: str  # "ablation", "layer" or "module": the RowEffects fields it fills
    index: int  # its place in those fields


@dataclass
class FullPass:
    """What the adapted model's forward left for the ablations and the attribution."""

    inputs: list[tuple[torch.Tensor | None, dict[str, Any]]]  # per layer: input hidden, kwargs
    final: torch.Tensor  # [n, H] the final norm's output, in the autograd graph
    activations: dict[str, torch.Tensor]  # module name -> lora_A output [1, n, r], in the graph


@dataclass
class Reference:
    """Per position, what every ablation is compared with: the full model's distribution p,
    kept as float32 weights w = p (1 + e), |e| < 6e-8. Every KL is taken as
    sum_v w (log p - log q), with w's own sums (not sum_v w = 1), which is off by at most
    6e-8 sum_v p |log p - log q|: second order, like the KL itself, in a small change of q."""

    weights: torch.Tensor  # [n-1, V] float32 w
    weighted_log_p: torch.Tensor  # [n-1] float64 sum_v w log p
    weight_sum: torch.Tensor  # [n-1] float64 sum_v w
    ce: torch.Tensor  # [n-1] float64 cross-entropy of the full model
    targets: torch.Tensor  # [n-1] the next tokens


def group_order(modules: list[LoraModule]) -> tuple[list[int], list[str]]:
    """The groups ablated at once: the adapted layers ascending, and the module names in
    module order (the order of RowEffects' layer and module fields)."""
    layers = sorted({m.layer for m in modules})
    names = sorted({m.module for m in modules}, key=module_order)
    return layers, names


class Effects:
    """Causal effects of every direction of `modules`, one row at a time (`row`)."""

    def __init__(
        self,
        model: nn.Module,
        modules: list[LoraModule],
        first: dict[str, int],
        max_batch_tokens: int,
        adapter: str = "default",
    ) -> None:
        """model: a PEFT model in eval mode, with its lm_head; modules: find_lora_modules(model);
        direction c of module m is row first[m.name] + c of every [D] and [D, n] tensor;
        max_batch_tokens: bounds (ablations in one forward) x (tokens of the row)."""
        self.model = model
        self.decoder = model.get_base_model().get_decoder()
        self.head = model.get_output_embeddings()
        self.lora_modules = modules
        self.first = first
        self.max_batch_tokens = max_batch_tokens
        self.num_directions = sum(m.rank for m in modules)
        self.lora_a = {m.name: model.get_submodule(m.name).lora_A[adapter] for m in modules}
        self.lora_b = {m.name: model.get_submodule(m.name).lora_B[adapter] for m in modules}
        self._layers, self._modules = group_order(modules)
        self.ablations = sorted(self._plan(), key=lambda a: a.start)  # stable: kinds stay in order

    @property
    def layers(self) -> list[int]:
        """The adapted layers, ascending: the order of layer_kl and layer_dloss."""
        return self._layers

    @property
    def modules(self) -> list[str]:
        """The adapted module names in module order: the order of module_kl and module_dloss."""
        return self._modules

    def _plan(self) -> Iterator[Ablation]:
        for m in self.lora_modules:
            for c in range(m.rank):
                yield Ablation(m.layer, {m.name: [c]}, "ablation", self.first[m.name] + c)
        for groups, kind, key in (
            (self._layers, "layer", lambda m: m.layer),
            (self._modules, "module", lambda m: m.module),
        ):
            for i, group in enumerate(groups):
                members = [m for m in self.lora_modules if key(m) == group]
                drop = {m.name: list(range(m.rank)) for m in members}
                yield Ablation(min(m.layer for m in members), drop, kind, i)

    def row(self, input_ids: torch.Tensor) -> RowEffects:
        """Every effect on one row: input_ids [n], n >= 2, on the model's input device."""
        n = input_ids.numel()
        if n < 2:
            raise ValueError(f"a row needs at least 2 tokens to predict one, got {n}")
        ids = input_ids.view(1, n)
        full = self._forward(ids)
        with torch.no_grad(), self.model.disable_adapter():
            base = self._final(ids)
        reference, kl_tokens, grad = self._compare(full.final, base, ids[0, 1:])
        del base
        sums = self._ablate(full.inputs, reference)
        activations, attribution = self._attribute(full, grad)
        return RowEffects(
            kl_tokens=kl_tokens.cpu(),
            activations=activations,
            attribution=attribution,
            **sums,
        )

    # ---- the full and base passes

    def _final(self, ids: torch.Tensor) -> torch.Tensor:
        """[n, H] the final norm's output of the model as it is set now."""
        return self.decoder(input_ids=ids, use_cache=False).last_hidden_state[0]

    def _forward(self, ids: torch.Tensor) -> FullPass:
        """The adapted model's forward with autograd on (for the attribution), keeping every
        layer's keyword arguments, the adapted layers' inputs and every lora_A output."""
        layers = self.decoder.layers
        inputs: list[tuple[torch.Tensor | None, dict[str, Any]]] = [(None, {})] * len(layers)
        activations: dict[str, torch.Tensor] = {}
        adapted = set(self._layers)

        def keep_input(layer: int) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                if len(args) > 1:  # the ablations pass the rest by name
                    raise RuntimeError(f"decoder layer {layer} got more positional arguments")
                kwargs = dict(kwargs)
                hidden = args[0] if args else kwargs.pop("hidden_states")
                inputs[layer] = (hidden.detach() if layer in adapted else None, kwargs)

            return hook

        def keep_activation(name: str) -> Callable:
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                if not output.requires_grad:  # no input needs a gradient: a leaf of the graph
                    output.requires_grad_()
                activations[name] = output  # [1, n, r]

            return hook

        handles = [
            layer.register_forward_pre_hook(keep_input(i), with_kwargs=True)
            for i, layer in enumerate(layers)
        ] + [a.register_forward_hook(keep_activation(name)) for name, a in self.lora_a.items()]
        try:
            with torch.enable_grad():
                final = self._final(ids)
        finally:
            for handle in handles:
                handle.remove()
        return FullPass(inputs, final, activations)

    def _compare(
        self, full: torch.Tensor, base: torch.Tensor, targets: torch.Tensor
    ) -> tuple[Reference, torch.Tensor, torch.Tensor]:
        """The full model's per-position reference, KL(full || base) per position, and
        dL/d(final hidden) [n, H] for L = the row's summed cross-entropy."""
        device = self.head.weight.device
        final = full.detach()
        targets = targets.to(device)
        positions = targets.numel()
        weights = torch.empty(positions, self.head.weight.shape[0], device=device)
        ce = torch.empty(positions, dtype=torch.float64, device=device)
        weighted_log_p, weight_sum, kl = (torch.empty_like(ce) for _ in range(3))
        grad = torch.zeros_like(final)  # the last position predicts nothing: no gradient
        for s in self._chunks(positions, 1):
            leaf = final[s].detach().requires_grad_()
            with torch.enable_grad():
                log_p = F.log_softmax(self.head(leaf.to(device)).double(), -1)  # [c, V]
                token_ce = -log_p.gather(1, targets[s, None])[:, 0]
                (grad[s],) = torch.autograd.grad(token_ce.sum(), leaf)
            log_p = log_p.detach()
            weights[s] = log_p.exp()
            w = weights[s].double()
            ce[s], weighted_log_p[s], weight_sum[s] = (
                token_ce.detach(),
                (w * log_p).sum(-1),
                w.sum(-1),
            )
            log_base = F.log_softmax(self.head(base[s].to(device)).double(), -1)
            kl[s] = weighted_log_p[s] - (w * log_base).sum(-1)
        reference = Reference(weights, weighted_log_p, weight_sum, ce, targets)
        return reference, kl, grad

    def _chunks(self, positions: int, width: int) -> Iterator[slice]:
        """Slices of positions small enough that `width` rows of float64 logits fit the budget."""
        step = max(1, LOGIT_ELEMENTS // (width * self.head.weight.shape[0]))
        for start in range(0, positions, step):
            yield slice(start, min(start + step, positions))

    # ---- the ablations

    def _ablate(self, inputs: list, reference: Reference) -> dict[str, torch.Tensor]:
        """Every ablation's summed KL and loss change, batched by start layer."""
        device = reference.ce.device
        sizes = {
            "ablation": self.num_directions,
            "layer": len(self._layers),
            "module": len(self._modules),
        }
        kl = {k: torch.zeros(size, dtype=torch.float64, device=device) for k, size in sizes.items()}
        dloss = {k: torch.zeros_like(v) for k, v in kl.items()}
        n = reference.ce.numel() + 1
        for batch in self._batches(max(1, self.max_batch_tokens // n)):
            batch_kl, batch_dloss = self._run(batch, inputs, reference)  # [A] each
            for i, ablation in enumerate(batch):
                kl[ablation.kind][ablation.index] = batch_kl[i]
                dloss[ablation.kind][ablation.index] = batch_dloss[i]
        return {
            "ablation_kl": kl["ablation"].cpu(),
            "ablation_dloss": dloss["ablation"].cpu(),
            "layer_kl": kl["layer"].cpu(),
            "layer_dloss": dloss["layer"].cpu(),
            "module_kl": kl["module"].cpu(),
            "module_dloss": dloss["module"].cpu(),
        }

    def _batches(self, width: int) -> Iterator[list[Ablation]]:
        """Runs of at most `width` ablations that start at the same layer."""
        batch: list[Ablation] = []
        for ablation in self.ablations:
            if batch and (len(batch) == width or batch[0].start != ablation.start):
                yield batch
                batch = []
            batch.append(ablation)
        if batch:
            yield batch

    @torch.no_grad()
    def _run(
        self, batch: list[Ablation], inputs: list, reference: Reference
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[A] summed KL(full || ablated) and CE_ablated - CE_full of one batch of ablations."""
        start, width = batch[0].start, len(batch)
        hidden = inputs[start][0].expand(width, -1, -1)  # [A, n, H]
        with self._zeroed(batch):
            for i in range(start, len(self.decoder.layers)):
                out = self.decoder.layers[i](hidden, **inputs[i][1])
                hidden = out[0] if isinstance(out, tuple) else out
            final = self.decoder.norm(hidden)  # [A, n, H]
        device = reference.ce.device
        kl = torch.zeros(width, dtype=torch.float64, device=device)
        dloss = torch.zeros_like(kl)
        for s in self._chunks(reference.ce.numel(), width):
            w = reference.weights[s].double()  # [c, V]
            logits = self.head(final[:, s].to(device)).double()  # [A, c, V]
            norm = logits.logsumexp(-1)  # [A, c]
            # sum_v w (log p - log q), with log q = logits - norm
            cross = torch.einsum("acv,cv->ac", logits, w)
            kl += (reference.weighted_log_p[s] - cross + norm * reference.weight_sum[s]).sum(1)
            target = logits.gather(2, reference.targets[s].expand(width, -1)[..., None])[..., 0]
            dloss += (norm - target - reference.ce[s]).sum(1)
        return kl, dloss

    @contextmanager
    def _zeroed(self, batch: list[Ablation]) -> Iterator[None]:
        """Batch element i has the lora_B columns of batch[i] zeroed: each lora_B input [A, n, r]
        is multiplied by a 0/1 keep-mask [A, 1, r] (exact: the other columns are untouched)."""
        masks: dict[str, torch.Tensor] = {}
        for i, ablation in enumerate(batch):
            for name, components in ablation.drop.items():
                if name not in masks:
                    b = self.lora_b[name].weight
                    masks[name] = torch.ones(
                        len(batch), 1, b.shape[1], dtype=b.dtype, device=b.device
                    )
                masks[name][i, 0, components] = 0
        handles = [
            self.lora_b[name].register_forward_pre_hook(
                lambda m, args, keep=keep: (args[0] * keep,)
            )
            for name, keep in masks.items()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ---- the attribution

    def _attribute(self, full: FullPass, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[D, n] activations and attribution -a * dL/da, one backward from the final hidden."""
        names = list(full.activations)
        values = [full.activations[name] for name in names]
        grads = torch.autograd.grad(
            full.final, values, grad_outputs=grad.to(full.final.device), allow_unused=True
        )
        n = full.final.shape[0]
        activations = torch.zeros(self.num_directions, n)
        attribution = torch.zeros(self.num_directions, n)
        for name, value, g in zip(names, values, grads, strict=True):
            rows = slice(self.first[name], self.first[name] + value.shape[-1])
            a = value.detach()[0].T.float().cpu()  # [r, n]
            activations[rows] = a
            if g is not None:  # None: this direction reaches no loss
                attribution[rows] = -a * g[0].T.float().cpu()
        return activations, attribution
