"""`make demo`'s job: LoRA training on the synthetic task lowers the loss."""
import torch

from lowrank import cli


def test_demo_loss_goes_down():
    losses = cli.demo(steps=25, rank=4, quiet=True)
    assert len(losses) == 25 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.95 * sum(losses[:5]) / 5, losses


def test_synthetic_task_is_learnable_structure():
    ids = cli.synthetic_batch(8, 12, 64, torch.Generator().manual_seed(0))
    diffs = (ids[:, 1:] - ids[:, :-1]) % 64
    assert ((diffs == diffs[:, :1]) & (diffs[:, :1] >= 1) & (diffs[:, :1] <= 3)).all()
