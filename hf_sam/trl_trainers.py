"""Ready-made TRL trainers: `SAMMixin` in front of TRL's `SFTTrainer`, `DPOTrainer`, `RewardTrainer` and `KTOTrainer`,
`SAMArgumentsMixin` in front of their configs. Importing this module needs `trl` (`pip install hf-sam[trl]`);
`import hf_sam` does not.

Every pass still goes through the TRL trainer's own `training_step` and `compute_loss` (its fused LM head, loss
types, activation offloading); only the step's clean pass feeds TRL's metrics and token count
(`hf_sam.host_state`). What each method does with a causal LM: docs/language-models.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

from .arguments import SAMArgumentsMixin
from .mixin import SAMMixin
from .msam import split_pairs


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

    sam_default_args_class = SAMSFTConfig


@dataclass
class SAMDPOConfig(SAMArgumentsMixin, DPOConfig):
    __doc__ = "[`~trl.DPOConfig`] plus the `sam_*` fields of [`SAMArgumentsMixin`].\n\n" + (
        SAMArgumentsMixin.__doc__ or ""
    )


class SAMDPOTrainer(SAMMixin, DPOTrainer):
    """TRL's `DPOTrainer` with the SAM step: the policy is perturbed, the reference model (or, under PEFT, the base
    with the adapters disabled) is not. Pass [`SAMDPOConfig`] as `args`.

    Refused: ESAM's data selection (`esam_gamma < 1`), whose per-example losses would have to be DPO's per-pair loss,
    and the one-pass loss terms (SAF, MESA), whose teacher or bank would score the model on DPO's preference batches
    (prompt, chosen and rejected columns, not model inputs).
    """

    sam_default_args_class = SAMDPOConfig

    def _sam_split_batch(self, inputs, shards: int):
        # DPO's batch is [chosen rows, rejected rows] and its loss pairs row i with row B + i: mSAM's shards must
        # hold whole pairs, not the first half of the chosen rows.
        return split_pairs(inputs, shards)

    def _sam_check_host(self, args) -> None:
        refuse_per_example_pieces(args, "SAMDPOTrainer", "DPO")


@dataclass
class SAMRewardConfig(SAMArgumentsMixin, RewardConfig):
    __doc__ = "[`~trl.RewardConfig`] plus the `sam_*` fields of [`SAMArgumentsMixin`].\n\n" + (
        SAMArgumentsMixin.__doc__ or ""
    )


class SAMRewardTrainer(SAMMixin, RewardTrainer):
    """TRL's `RewardTrainer` (a Bradley-Terry loss on the scores of chosen and rejected texts) with the SAM step.
    Pass [`SAMRewardConfig`] as `args`. Refused as under [`SAMDPOTrainer`]: ESAM's data selection and SAF / MESA.
    """

    sam_default_args_class = SAMRewardConfig

    def _sam_split_batch(self, inputs, shards: int):
        # As DPO's: the batch is [chosen rows, rejected rows], and the loss pairs row i with row B + i (`margin`,
        # when the data has one, is one value per pair).
        return split_pairs(inputs, shards)

    def _sam_check_host(self, args) -> None:
        refuse_per_example_pieces(args, "SAMRewardTrainer", "the reward model's")


@dataclass
class SAMKTOConfig(SAMArgumentsMixin, KTOConfig):
    __doc__ = "[`~trl.KTOConfig`] plus the `sam_*` fields of [`SAMArgumentsMixin`].\n\n" + (
        SAMArgumentsMixin.__doc__ or ""
    )


class SAMKTOTrainer(SAMMixin, KTOTrainer):
    """TRL's `KTOTrainer` (unpaired desirable / undesirable completions) with the SAM step: the policy is perturbed,
    the reference model (under PEFT: the base with the adapters disabled) is not, and KTO's KL estimate is the
    policy's at the pass's weights. Pass [`SAMKTOConfig`] as `args`; any SAM method at `sam_rho=0` reproduces
    `KTOTrainer` bit for bit, logged metrics included.

    Refused: ESAM's data selection (`esam_gamma < 1`). Its per-example losses are read from the fused LM head as each
    completion's negative log-likelihood, which is not KTO's loss: an undesirable completion's KTO loss rises as its
    likelihood does.
    """

    sam_default_args_class = SAMKTOConfig

    def _sam_check_host(self, args) -> None:
        if args.sam_enabled and args.esam_gamma < 1:
            raise ValueError(
                f"ESAM's data selection (esam_gamma={args.esam_gamma}) ranks examples by the rise of their loss, read"
                " as each completion's negative log-likelihood, and KTO's loss is a sigmoid of the completion's"
                " log-ratio to the reference model (it falls as an undesirable completion's likelihood falls):"
                " SAMKTOTrainer does not select. Set --esam_gamma 1 (ESAM's weight perturbation alone) or use"
                " --sam_method sam."
            )


def refuse_per_example_pieces(args, trainer: str, loss: str) -> None:
    """Refuse, before the host is built, what needs a loss per example on a host whose loss is per preference pair."""
    if args.sam_loss_term != "none":
        raise ValueError(
            f"sam_method={args.sam_method!r} is not supported by {trainer}: its loss term compares the model's"
            " logits with a teacher's (MESA) or a bank's (SAF) per training input, and the batches are preference"
            " pairs. Use a method that perturbs the weights, e.g. --sam_method sam."
        )
    if args.sam_enabled and args.esam_gamma < 1:
        raise ValueError(
            f"ESAM's data selection (esam_gamma={args.esam_gamma}) ranks examples by their own loss, which {loss}"
            f" loss only defines per preference pair: {trainer} does not select. Set --esam_gamma 1 (ESAM's weight"
            " perturbation alone) or use --sam_method sam."
        )
