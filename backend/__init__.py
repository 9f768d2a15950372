"""Read what a LoRA adapter has learned: per-direction activations of `lora_A · x`.

One module per concern: `config` (the run's options, once), `adapter` (an adapter's files
checked before loading), `loading` (model, tokenizer, adapter), `directions` (the A/B vectors
PEFT created), `data` (rows -> token batches), `capture` (hooks that compute activations in the
model's own forward pass), `tracking` (streaming top-k, statistics, histograms), `output` (the
JSON of the data contract), `analysis` (one streaming pass, checkpointed), and `pipeline`, whose
`analyze` ties them together: rows and a loaded model in, the run's state out.
"""

import sys


class UserError(Exception):
    """A problem with the user's input: reported as one line, never a traceback."""


class OptionError(UserError):
    """An option's value that only the loaded model shows to be impossible: exit status 2, as
    for the options argparse refuses."""


def warn(message: str) -> None:
    """One `warning: ...` line on stderr that does not break a progress bar."""
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)
