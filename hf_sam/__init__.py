"""hf_sam: Sharpness-Aware Minimization and its efficient variants as a drop-in for `transformers.Trainer`."""

from .arguments import SAMArgumentsMixin, SAMSeq2SeqTrainingArguments, SAMTrainingArguments
from .methods import METHODS
from .mixin import SAMMixin
from .trainer import SAMSeq2SeqTrainer, SAMTrainer
from .trajectory import add_example_index


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
