"""Read what a LoRA adapter has learned: per-direction activations of `lora_A · x`.

One module per concern: `adapter` (an adapter's files checked before loading), `loading` (model,
tokenizer, adapter), `directions` (the A/B vectors
PEFT created), `data` (rows -> token batches), `capture` (hooks that compute activations in the
model's own forward pass), `tracking` (streaming top-k, statistics, histograms), `output` (the
JSON of the data contract), and `analysis`, which ties them into one streaming pass.
"""

import sys


class UserError(Exception):
    """A problem with the user's input: reported as one line, never a traceback."""


def warn(message: str) -> None:
    """One `warning: ...` line on stderr that does not break a progress bar."""
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)
