"""hf_sam: Sharpness-Aware Minimization and its efficient variants as a drop-in for `transformers.Trainer`."""

from .arguments import SAMArgumentsMixin, SAMSeq2SeqTrainingArguments, SAMTrainingArguments
from .methods import METHODS
from .mixin import SAMMixin
from .saf import add_example_index
from .trainer import SAMSeq2SeqTrainer, SAMTrainer


__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "SAMArgumentsMixin",
    "SAMMixin",
    "SAMSeq2SeqTrainer",
    "SAMSeq2SeqTrainingArguments",
    "SAMTrainer",
    "SAMTrainingArguments",
    "add_example_index",
]
