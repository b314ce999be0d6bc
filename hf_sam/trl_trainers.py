"""Ready-made TRL trainers: `SAMMixin` in front of TRL's `SFTTrainer` and `DPOTrainer`, `SAMArgumentsMixin` in front
of their configs. Importing this module needs `trl` (`pip install hf-sam[trl]`); `import hf_sam` does not.

Every pass still goes through the TRL trainer's own `training_step` and `compute_loss` (its fused LM head, loss
types, activation offloading); only the step's clean pass feeds TRL's metrics and token count
(`hf_sam.host_state`). What each method does with a causal LM: docs/language-models.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from .arguments import SAMArgumentsMixin
from .mixin import SAMMixin


@dataclass
class SAMSFTConfig(SAMArgumentsMixin, SFTConfig):
    __doc__ = "[`~trl.SFTConfig`] plus the `sam_*` fields of [`SAMArgumentsMixin`].\n\n" + (
        SAMArgumentsMixin.__doc__ or ""
    )


class SAMSFTTrainer(SAMMixin, SFTTrainer):
    """TRL's `SFTTrainer` with the SAM step of `SAMMixin`; same signature as `SFTTrainer`.

    Pass [`SAMSFTConfig`] as `args`; `sam_method="none"` reproduces `SFTTrainer` bit for bit, and so does any SAM
    method at `sam_rho=0`, logged metrics and token counts included.
    """


@dataclass
class SAMDPOConfig(SAMArgumentsMixin, DPOConfig):
    __doc__ = "[`~trl.DPOConfig`] plus the `sam_*` fields of [`SAMArgumentsMixin`].\n\n" + (
        SAMArgumentsMixin.__doc__ or ""
    )


class SAMDPOTrainer(SAMMixin, DPOTrainer):
    """TRL's `DPOTrainer` with the SAM step: the policy is perturbed, the reference model (or, under PEFT, the base
    with the adapters disabled) is not. Pass [`SAMDPOConfig`] as `args`."""
