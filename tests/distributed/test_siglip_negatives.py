"""Stage 0's sigmoid loss with every rank's pairs as negatives equals the single-process loss of the
concatenated batch (loss and gradients), also when ranks hold different numbers of pairs."""

import pytest
import torch
from harness import run_ranks
from torch import nn

from keye_train.distributed.contrastive import sigmoid_loss_global_negatives
from keye_train.models.siglip_text import sigmoid_contrastive_loss

COUNTS = (3, 5)  # pairs on rank 0 and rank 1


class Towers(nn.Module):
    """Two small linear towers and SigLIP's scale and bias: enough parameters to compare gradients."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(6, 4)
        self.text = nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.logit_bias = nn.Parameter(torch.tensor(-3.0))


def _inputs(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, 6, generator=gen), torch.randn(count, 5, generator=gen)


def _rank(rank, world_size):
    towers = Towers()
    images, texts = _inputs(COUNTS[rank], seed=rank)
    loss = sigmoid_loss_global_negatives(
        towers.image(images),
        towers.text(texts),
        logit_scale=towers.logit_scale,
        logit_bias=towers.logit_bias,
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in towers.named_parameters()}
    for grad in grads.values():
        torch.distributed.all_reduce(grad)
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    return {"loss": total.item(), "grads": grads}


@pytest.mark.dist
def test_global_negatives_equal_the_concatenated_single_process_batch():
    results = run_ranks(_rank, world_size=2)
    towers = Towers()
    parts = [_inputs(count, seed=rank) for rank, count in enumerate(COUNTS)]
    images = torch.cat([p[0] for p in parts])
    texts = torch.cat([p[1] for p in parts])
    loss = sigmoid_contrastive_loss(
        towers.image(images), towers.text(texts), logit_scale=towers.logit_scale, logit_bias=towers.logit_bias
    )
    loss.backward()
    # Per-rank negatives only would give another loss: the comparison can fail.
    local_only = sum(
        sigmoid_contrastive_loss(
            towers.image(i), towers.text(t), logit_scale=towers.logit_scale, logit_bias=towers.logit_bias
        ).item()
        * len(i)
        for i, t in parts
    ) / len(images)
    assert abs(local_only - loss.item()) > 1e-2
    for result in results:
        assert result["loss"] == pytest.approx(loss.item(), rel=1e-6)
        for name, param in towers.named_parameters():
            torch.testing.assert_close(result["grads"][name], param.grad, atol=1e-6, rtol=1e-5, msg=name)
