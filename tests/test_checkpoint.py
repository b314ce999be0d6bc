"""Method state in checkpoints: namespaced per piece, and every piece gets back exactly what it saved."""

import pytest
import torch

from hf_sam import SAMTrainer
from hf_sam.ascent import AscentRule
from tests.helpers import sam_args, tiny_bert, tiny_dataset
from tests.method_cases import METHOD_CASES


STATEFUL = ["fsam", "looksam", "ssam-d", "ssam-f", "saf", "mesa"]
NAMESPACES = ("ascent.", "mask.", "descent.0.", "loss_term.")


def trained(tmp_path, method, **extra):
    args = sam_args(tmp_path, max_steps=3, **{**METHOD_CASES[method]["args"], **extra})
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=tiny_dataset())
    trainer.train()
    return trainer


@pytest.mark.parametrize("method", STATEFUL)
def test_every_piece_gets_back_exactly_what_it_saved(tmp_path, method):
    saved = trained(tmp_path / "a", method).sam_state_dict()
    assert saved and all(key.startswith(NAMESPACES) for key in saved)
    fresh = SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path / "b", max_steps=3, **METHOD_CASES[method]["args"]),
                       train_dataset=tiny_dataset())  # fmt: skip
    if fresh.args.sam_enabled:
        fresh._sam_build()
    if method == "saf":  # train() numbers the examples before a resume loads the state
        from hf_sam import add_example_index

        fresh.train_dataset = add_example_index(fresh.train_dataset)
    fresh.load_sam_state_dict({k: v.clone() for k, v in saved.items()})
    loaded = fresh.sam_state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k].cpu(), saved[k].cpu()) for k in saved)


class CountingAscent(AscentRule):
    """A stateful rule under a key prefix no built-in piece uses: its state must still come back on resume."""

    def __init__(self, args):
        super().__init__(args)
        self.calls = torch.zeros(())

    def __call__(self, names, params, grads, rho, grad_unit, grad_norm):
        self.calls += 1
        return super().__call__(names, params, grads, rho, grad_unit, grad_norm)

    def state_dict(self):
        return {"counting_calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["counting_calls"].clone()


def test_a_new_stateful_ascent_rule_gets_its_state_back_without_any_routing(tmp_path, monkeypatch):
    from hf_sam import components

    monkeypatch.setitem(components.ASCENT_RULES, "sam", CountingAscent)
    first = SAMTrainer(model=tiny_bert(), train_dataset=tiny_dataset(),
                       args=sam_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2))  # fmt: skip
    first.train()
    resumed = SAMTrainer(model=tiny_bert(), train_dataset=tiny_dataset(), args=sam_args(tmp_path, max_steps=3))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert float(resumed._sam.perturbation.rule.calls) == 3.0  # 2 before the checkpoint, 1 after


def test_state_no_piece_of_the_run_owns_is_refused(tmp_path):
    trainer = trained(tmp_path, "fsam")
    state = trainer.sam_state_dict()
    state["descent.0.looksam_gv.classifier.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match="no piece of this run"):
        trainer.load_sam_state_dict(state)
