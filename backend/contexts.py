"""A batch's tokens as the summaries read them, and the context windows they keep of a token.

A kept token carries its window of +-W tokens (clipped to its sequence), its direction's
activations there, and the activations there of its siblings: the other adapted modules of the
same layer with the same component (gate_proj's siblings are up_proj and down_proj), so that a
reader can compare a layer's directions on the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class BatchTokens:
    acts: torch.Tensor  # [D, B*L] float32, row-major over (sequence, position)
    real: torch.Tensor  # [N] flat positions of the real (non-padding) tokens
    input_ids: torch.Tensor  # [B, L]
    lengths: torch.Tensor  # [B] real tokens per row (right padding)
    example_index: torch.Tensor  # [B]
    window: int
    siblings: torch.Tensor  # [D, S] direction indices, -1 where a direction has fewer
    row: torch.Tensor = field(init=False)  # [N] batch row of each real token
    position: torch.Tensor = field(init=False)  # [N] its position in its sequence
    ids: torch.Tensor = field(init=False)  # [N] its token id
    example: torch.Tensor = field(init=False)  # [N] its example index

    def __post_init__(self) -> None:
        length = self.input_ids.shape[1]
        self.row, self.position = self.real // length, self.real % length
        self.ids = self.input_ids.flatten()[self.real]
        self.example = self.example_index[self.row]

    def contexts(
        self, direction: torch.Tensor, n: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Windows around real tokens n (indices into `real`) for `direction` (same shape [...]).

        Returns ids [..., C] (-1 outside the sequence), the direction's activations [..., C] and
        its siblings' [..., S, C]; C = 2W+1.
        """
        offsets = torch.arange(-self.window, self.window + 1, device=n.device)
        position = self.position[n][..., None] + offsets
        inside = (position >= 0) & (position < self.lengths[self.row[n]][..., None])
        at = (self.real[n][..., None] + offsets).clamp(0, self.acts.shape[1] - 1)
        ids = self.input_ids.flatten()[at].masked_fill_(~inside, -1)
        siblings = self.siblings[direction].clamp(min=0)  # [..., S]; -1s are dropped on export
        return (
            ids,
            self.acts[direction[..., None], at],
            self.acts[siblings[..., None], at[..., None, :]],
        )


@dataclass
class Example:
    """One kept token: what the contract calls an Example, with ids instead of strings."""

    activation: float
    example_index: int
    token_index: int
    context_ids: list[int]  # token ids of the clipped window
    context_acts: list[float]  # this direction's activation at each of them
    target: int  # position of the token itself inside the window
    siblings: dict[int, list[float]]  # sibling direction -> its activations on the window


def unpack(
    values: torch.Tensor,  # [m] activations (any sign)
    example: torch.Tensor,  # [m]
    position: torch.Tensor,  # [m]
    context_ids: torch.Tensor,  # [m, C]
    context_acts: torch.Tensor,  # [m, C]
    sibling_acts: torch.Tensor,  # [m, S, C]
    siblings: list[int],  # [S] sibling direction indices, -1 for none
) -> list[Example]:
    """Kept tokens as Examples, their windows clipped to the sequence."""
    window = (context_ids.shape[1] - 1) // 2
    examples = []
    for i in range(values.shape[0]):
        inside = context_ids[i] >= 0
        examples.append(
            Example(
                activation=float(values[i]),
                example_index=int(example[i]),
                token_index=int(position[i]),
                context_ids=context_ids[i][inside].tolist(),
                context_acts=context_acts[i][inside].tolist(),
                target=window - int((~inside[:window]).sum()),
                siblings={
                    s: sibling_acts[i, j][inside].tolist() for j, s in enumerate(siblings) if s >= 0
                },
            )
        )
    return examples
