"""A second, independent reference: pytorch-optimizer's SAM, Friendly SAM and GSAM driven by hand.

Their classes wrap the base optimizer and run the two passes themselves; here they run the same micro-batches
as SAMTrainer (GA 1, SGD with momentum, SAM on every step) and must end at the same weights. Their ASAM applies
|w| + 0 to biases, as our preset does with eta = 0.01 (the official ASAM code keeps T = 1 on biases: our
`sam_adaptive_bias false`): they are compared with eta = 0 on a bias-free model and on a model with biases.
LookSAM's projection is per tensor there and over the whole vector here (docs/methods.md#looksam),
so they differ on purpose.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_same_weights, batches, copy_model, state, tiny_bert, tiny_dataset
from tests.test_trainer import train_sam


po = pytest.importorskip("pytorch_optimizer")

STEPS, BATCH, LR, MOMENTUM = 4, 2, 0.1, 0.9


def loss_of(model, batch):
    return F.cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"])


def closure_for(model, batch):
    def closure():
        model.zero_grad()
        with torch.enable_grad():  # their step runs under no_grad
            loss = loss_of(model, batch)
            loss.backward()
        return None, loss.detach()

    return closure


def run_two_step(optimizer_cls, model, **kwargs):
    """first_step / second_step, the closure-free API of their SAM-family wrappers."""
    opt = optimizer_cls(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, **kwargs)
    for batch in batches(tiny_dataset(), BATCH)[:STEPS]:
        model.zero_grad()
        loss_of(model, batch).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, batch).backward()
        opt.second_step(zero_grad=True)
    return model


def ours(tmp_path, **args):
    model = tiny_bert()
    reference = copy_model(model)
    trainer = train_sam(tmp_path, model, tiny_dataset(), "sgd", max_steps=STEPS, per_device_train_batch_size=BATCH,
                        **args)  # fmt: skip
    return trainer.model, reference


def test_sam_matches_pytorch_optimizer(tmp_path):
    model, reference = ours(tmp_path, sam_method="sam", sam_rho=0.05)
    run_two_step(po.SAM, reference, rho=0.05)
    assert_same_weights(state(model), state(reference), exact=False)


def test_friendly_sam_matches_pytorch_optimizer(tmp_path):
    model, reference = ours(tmp_path, sam_method="fsam", sam_rho=0.05, fsam_sigma=1.0, fsam_lambda=0.6)
    run_two_step(po.FriendlySAM, reference, rho=0.05, sigma=1.0, lmbda=0.6)
    assert_same_weights(state(model), state(reference), exact=False)


def test_gsam_matches_pytorch_optimizer(tmp_path):
    model, reference = ours(tmp_path, sam_method="gsam", sam_rho=0.05, gsam_alpha=0.4)
    base = torch.optim.SGD(reference.parameters(), lr=LR, momentum=MOMENTUM)
    constant = torch.optim.lr_scheduler.LambdaLR(base, lambda _: 1.0)
    rho = po.lr_scheduler.proportion.ProportionScheduler(constant, max_lr=LR, min_lr=0.0, max_value=0.05,
                                                         min_value=0.05)  # fmt: skip
    opt = po.GSAM(reference.parameters(), base, reference, rho, alpha=0.4)
    for batch in batches(tiny_dataset(), BATCH)[:STEPS]:
        opt.step(closure_for(reference, batch))
        opt.update_rho_t()
    assert_same_weights(state(model), state(reference), exact=False)


class BiasFreeClassifier(torch.nn.Module):
    """Embedding, mean pool, two bias-free linear layers: a model where both ASAM bias rules coincide."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 16)
        self.hidden = torch.nn.Linear(16, 16, bias=False)
        self.out = torch.nn.Linear(16, 3, bias=False)

    def forward(self, input_ids, labels=None):
        logits = self.out(torch.relu(self.hidden(self.embed(input_ids).mean(1))))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def test_asam_matches_pytorch_optimizer_where_the_rules_coincide(tmp_path):
    model = BiasFreeClassifier()
    reference = copy_model(model)
    train_sam(tmp_path, model, tiny_dataset(), "sgd", max_steps=STEPS, per_device_train_batch_size=BATCH,
              sam_method="asam", sam_rho=0.5, sam_adaptive_eta=0.0, sam_schedule="always")  # fmt: skip
    opt = po.SAM(reference.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, lr=LR, momentum=MOMENTUM)
    for batch in batches(tiny_dataset(), BATCH)[:STEPS]:
        reference.zero_grad()
        reference(**batch)["loss"].backward()
        opt.first_step(zero_grad=True)
        reference(**batch)["loss"].backward()
        opt.second_step(zero_grad=True)
    assert_same_weights(state(model), state(reference), exact=False)


def test_asam_with_scaled_biases_matches_pytorch_optimizer_on_a_model_with_biases(tmp_path):
    model = tiny_bert()  # biases and LayerNorms: with the paper's T = 1 on biases it would differ from theirs here
    reference = copy_model(model)
    train_sam(tmp_path, model, tiny_dataset(), "sgd", max_steps=STEPS, per_device_train_batch_size=BATCH,
              sam_method="asam", sam_rho=0.5, sam_adaptive_eta=0.0, sam_schedule="always")  # fmt: skip
    run_two_step(po.SAM, reference, rho=0.5, adaptive=True)
    assert_same_weights(state(model), state(reference), exact=False)
