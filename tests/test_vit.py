"""Every registered method on a tiny ViT image classifier (the README's method table, ViT column)."""

import pytest
import torch
from datasets import Dataset
from transformers import ViTConfig, ViTForImageClassification

from hf_sam import METHODS
from tests.helpers import state
from tests.method_cases import METHOD_CASES
from tests.test_trainer import optimizer_for, train_sam


def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=24, num_labels=3, hidden_dropout_prob=0.1)  # fmt: skip
    return ViTForImageClassification(config)


def images(n: int = 16) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    return Dataset.from_dict({
        "pixel_values": torch.randn(n, 1, 8, 8, generator=generator).tolist(),
        "labels": torch.randint(0, 3, (n,), generator=generator).tolist(),
    }).with_format("torch")  # fmt: skip


# The default suite runs the methods whose path differs most on a ViT (per-example losses, the loss terms with their
# index column and teacher); every other one runs under the slow marker.
DEFAULT = ("sam", "esam", "saf", "mesa")


@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m in DEFAULT else pytest.mark.slow) for m in METHODS])
def test_each_method_trains_a_vit(tmp_path, method):
    model = tiny_vit()
    before = state(model)
    overrides = {"sam_fisher_samples": 4} if method == "ssam-f" else {}
    trainer = train_sam(tmp_path, model, images(), optimizer_for(method, "adamw"), max_steps=2,
                        **{**METHOD_CASES[method]["args"], **overrides})  # fmt: skip
    after = state(trainer.model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in after)
    history = trainer.state.log_history
    if method == "momentum-sam":  # no clean pass, so no sharpness: it logs the norm of the momentum it steps along
        assert any(h.get("sam/momentum_norm", 0) > 0 for h in history)
    elif method not in ("none", "saf", "mesa"):
        assert any("sam/sharpness" in h for h in history)
