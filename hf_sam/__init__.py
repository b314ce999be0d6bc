"""hf_sam: Sharpness-Aware Minimization and its efficient variants as a drop-in for `transformers.Trainer`."""

import importlib.util

from .arguments import SAMArgumentsMixin, SAMSeq2SeqTrainingArguments, SAMTrainingArguments
from .methods import METHODS
from .mixin import SAMMixin
from .saf import add_example_index
from .trainer import SAMSeq2SeqTrainer, SAMTrainer


__version__ = "0.1.0"

# Need TRL, so they are imported on first use: `import hf_sam` works without it.
_TRL_NAMES = (
    "SAMDPOConfig",
    "SAMDPOTrainer",
    "SAMKTOConfig",
    "SAMKTOTrainer",
    "SAMRewardConfig",
    "SAMRewardTrainer",
    "SAMSFTConfig",
    "SAMSFTTrainer",
)


def __getattr__(name: str):
    if name in _TRL_NAMES:
        try:
            from . import trl_trainers
        except ImportError as err:
            raise ImportError(f"hf_sam.{name} needs TRL: pip install 'hf-sam[trl]' ({err}).") from err
        return getattr(trl_trainers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
if importlib.util.find_spec("trl") is not None:  # `from hf_sam import *` must work without TRL
    __all__ += list(_TRL_NAMES)
