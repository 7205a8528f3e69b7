"""The chunked LM-head loss equals the plain materialised-logits cross entropy, loss and gradients, and
never saves a [tokens x vocab] tensor for backward."""

import pytest
import torch
import torch.nn.functional as F

from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.models.lm_head import chunked_linear_cross_entropy
from keye_train.testing.toy_batch import toy_packed_batch
from keye_train.train.loss import LossConfig, token_cross_entropy

TOL = dict(atol=1e-6, rtol=1e-6)


def _problem(tokens=301, dim=16, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, tokens, dim, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, dim, generator=g) * 0.3).requires_grad_()
    labels = torch.randint(0, vocab, (2, tokens), generator=g)
    labels[:, ::7] = -100  # ignored tokens, some of them at chunk edges
    labels[1, :40] = -100  # a whole chunk without targets
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [7, 37, 64, 10_000])
def test_chunked_equals_plain_loss_and_gradients(chunk):
    hidden, weight, labels = _problem()
    plain = F.cross_entropy(
        F.linear(hidden, weight).reshape(-1, weight.shape[0]), labels.reshape(-1), reduction="sum"
    )
    targets = int((labels != -100).sum())
    # Gradients of the mean, as training normalises the sum by the target count.
    ref = torch.autograd.grad(plain / targets, [hidden, weight])
    loss, count = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    got = torch.autograd.grad(loss / targets, [hidden, weight])
    assert int(count) == targets
    torch.testing.assert_close(loss, plain, **TOL)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **TOL)


def test_no_tokens_by_vocab_tensor_is_saved_for_backward():
    hidden, weight, labels = _problem(tokens=512, vocab=4096)
    chunk = 64
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    loss.backward()
    full = hidden.shape[0] * hidden.shape[1] * weight.shape[0]
    assert max(sizes) <= max(weight.numel(), hidden.numel()) < full
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the plain loss does save it
        chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=0)
    assert max(sizes) == full


def test_model_loss_with_labels_equals_logits_loss():
    cfg = tiny()
    batch = toy_packed_batch(cfg)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "cu_seqlens", "pixel_values", "grid_thw")}
    inputs["position_ids"] = batch["position_ids"]
    ref_model, model = build_model(cfg, seed=0), build_model(cfg, seed=0)
    ids = inputs.pop("input_ids")
    ref_sum, ref_count = token_cross_entropy(ref_model(ids, **inputs), batch["labels"])
    ref_sum.backward()
    model.lm_head.chunk_tokens = 16
    loss_sum, count = model(ids, **inputs, labels=batch["labels"])
    loss_sum.backward()
    assert int(count) == int(ref_count)
    torch.testing.assert_close(loss_sum, ref_sum, **TOL)
    ref_grads = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_loss_config_rejects_negative_chunk():
    with pytest.raises(ValueError, match=r"loss.chunk_tokens=-1"):
        LossConfig(chunk_tokens=-1)
