"""The private `transformers.Trainer` members hf_sam relies on, by name and signature.

hf_sam overrides or calls these (see hf_sam/mixin.py, saf.py, masks.py, loss_term.py). A transformers release that
renames one, or changes its parameters, fails here with the member's name, rather than somewhere inside a SAM step.
"""

import inspect

import pytest
from transformers import Trainer

from tests.helpers import SequentialSAMTrainer, sam_args, tiny_bert, tiny_dataset


# method -> the leading parameter names hf_sam passes (after self)
METHODS = {
    "training_step": ["model", "inputs", "num_items_in_batch"],
    "compute_loss": ["model", "inputs", "return_outputs", "num_items_in_batch"],
    "get_batch_samples": ["epoch_iterator", "num_batches", "device"],
    "log": ["logs"],
    "train": ["resume_from_checkpoint"],
    "_prepare_inputs": ["inputs"],
    "_remove_unused_columns": ["dataset", "description"],
    "_get_collator_with_removed_columns": ["data_collator", "description"],
    "_set_signature_columns_if_needed": [],
    "_save_optimizer_and_scheduler": ["output_dir"],
    "_load_optimizer_and_scheduler": ["checkpoint"],
    "_get_learning_rate": [],
    "compute_loss_context_manager": [],
    "get_tp_size": [],
    "create_optimizer": ["model"],
}
# attributes read on a constructed trainer, and (second set) once training has started
ATTRIBUTES = [
    "accelerator",
    "model_accepts_loss_kwargs",
    "compute_loss_func",
    "label_smoother",
    "optimizer_cls_and_kwargs",
    "state",
]
TRAINING_ATTRIBUTES = ["current_gradient_accumulation_steps", "_train_batch_size", "_signature_columns"]


@pytest.mark.parametrize("name", METHODS)
def test_trainer_keeps_the_methods_hf_sam_overrides_or_calls(name):
    member = getattr(Trainer, name, None)
    assert callable(member), f"transformers.Trainer.{name} is gone: hf_sam overrides or calls it"
    parameters = [p for p in inspect.signature(member).parameters if p != "self"]
    expected = METHODS[name]
    assert parameters[: len(expected)] == expected, f"Trainer.{name}{inspect.signature(member)} changed"


def test_trainer_keeps_the_attributes_hf_sam_reads(tmp_path):
    args = sam_args(tmp_path, max_steps=1)
    trainer = SequentialSAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())
    for name in ATTRIBUTES:
        assert hasattr(trainer, name), f"Trainer no longer sets {name}"
    trainer.train()
    for name in TRAINING_ATTRIBUTES:
        assert hasattr(trainer, name), f"Trainer no longer sets {name} during training"
