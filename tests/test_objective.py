"""The DUSA objective on hand-computed cases: candidates, weights, mixture, loss terms."""

import math

import pytest
import torch
import torch.nn.functional as F

from dusa_cli.draws import Draws, ImageDraws, sample_without_replacement, task_key
from dusa_cli.objective import LossWeights, mix, prediction_loss, select_candidates


def test_hand_computed_two_candidate_case() -> None:
    # logits (3, 4, 0): norm 5 → normalised (0.6, 0.8, 0); top-2 = classes 1, 0.
    logits = torch.tensor([[3.0, 4.0, 0.0]], requires_grad=True)
    candidates = select_candidates(logits, topk=2, extra=0)
    assert candidates.classes.tolist() == [[1, 0]]
    w1 = math.exp(0.8) / (math.exp(0.8) + math.exp(0.6))
    assert candidates.weights.tolist()[0] == pytest.approx([w1, 1 - w1], abs=1e-6)
    # predictions: class 1 predicts all-ones, class 0 all-zeros; target all 0.5 → mixture w1.
    predictions = torch.stack([torch.ones(1, 2, 2), torch.zeros(1, 2, 2)]).unsqueeze(0)  # (1, 2, 1, 2, 2)
    target = torch.full((1, 1, 2, 2), 0.5)
    mixture = mix(predictions, candidates.weights)
    assert torch.allclose(mixture, torch.full_like(target, w1))
    loss = prediction_loss(mixture, target, LossWeights())
    assert loss.item() == pytest.approx((w1 - 0.5) ** 2, rel=1e-5)
    # norm_l2 = e / √(e + 0.001) of the image's MSE e, cosine = 1 - cos: both by hand on the same numbers.
    both = prediction_loss(mixture, target, LossWeights(mse=0, norm_l2=1, cosine=1))
    error = (w1 - 0.5) ** 2
    assert both.item() == pytest.approx(error / math.sqrt(error + 1e-3) + 0.0, rel=1e-5)  # one channel, both positive: cosine 1
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_raw_logits_ablation_changes_the_weights_not_the_classes() -> None:
    logits = torch.tensor([[3.0, 4.0, 0.0, 1.0]])
    normed = select_candidates(logits, topk=2, extra=0)
    raw = select_candidates(logits, topk=2, extra=0, normalize_logits=False)
    assert normed.classes.tolist() == raw.classes.tolist()
    assert raw.weights[0, 0].item() == pytest.approx(math.exp(4) / (math.exp(4) + math.exp(3)))
    assert raw.weights[0, 0] > normed.weights[0, 0]  # normalised logits give flatter weights


def test_extra_classes_never_repeat_or_hit_the_top_k() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        logits = torch.randn(8, 10, generator=generator) * 5
        candidates = select_candidates(logits, topk=4, extra=2, draws=Draws(generator))
        top = logits.topk(4).indices
        assert torch.equal(candidates.classes[:, :4], top)
        for row in candidates.classes.tolist():
            assert len(set(row)) == 6
    uniform = select_candidates(torch.randn(64, 10), topk=4, extra=6, extra_sampling="uniform")
    assert all(len(set(row)) == 10 for row in uniform.classes.tolist())  # exhausts the rest exactly


def test_a_temperature_low_enough_to_underflow_still_draws_distinct_non_top_classes() -> None:
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(2)) * 3
    logits[:, 0] = 100.0  # class 0 in the top-k: the index a zero-probability draw falls back to
    candidates = select_candidates(logits, topk=4, extra=2, temperature=1e-3, draws=Draws(torch.Generator().manual_seed(0)))
    for row, logit_row in zip(candidates.classes.tolist(), logits):
        assert len(set(row)) == 6
        assert row[4] == logit_row.topk(5).indices[4].item()  # T → 0: the next most likely class first
    # Six classes: the two extras are the only non-top ones, one of them underflowed to 0.
    few = select_candidates(torch.tensor([[100.0, 99, 98, 97, 0, -50]]).expand(64, -1), topk=4, extra=2,
                            temperature=1e-3, draws=Draws(torch.Generator().manual_seed(0)))
    assert few.classes.tolist() == [[0, 1, 2, 3, 4, 5]] * 64


def test_extra_classes_follow_the_softmax_of_the_raw_logits_over_the_rest() -> None:
    logits = torch.tensor([[9.0, 8.0, 7.0, 6.0, 2.0, 1.0, 0.0]]).expand(20000, -1)
    generator = torch.Generator().manual_seed(1)
    drawn = select_candidates(logits, topk=4, extra=1, temperature=2.0, draws=Draws(generator)).classes[:, 4]
    frequencies = torch.bincount(drawn, minlength=7)[4:].float() / len(drawn)
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]) / 2.0, dim=0)
    assert torch.allclose(frequencies, expected, atol=0.015)


def test_gradient_reaches_the_classifier_only_through_the_weights() -> None:
    logits = torch.randn(2, 10, requires_grad=True)
    predictions = torch.randn(2, 6, 3, 4, 4, requires_grad=True)
    target = torch.randn(2, 3, 4, 4)
    candidates = select_candidates(logits, draws=Draws(torch.Generator().manual_seed(0)))
    loss = prediction_loss(mix(predictions, candidates.weights), target, LossWeights())
    grad_logits, grad_predictions = torch.autograd.grad(loss, [logits, predictions])
    expected_prediction_grad = (
        2 * (mix(predictions, candidates.weights) - target) / target.numel()
    ).unsqueeze(1) * candidates.weights[..., None, None, None]
    assert torch.allclose(grad_predictions, expected_prediction_grad.detach(), atol=1e-6)
    assert grad_logits.abs().sum() > 0


def test_loss_terms_against_torch_reference() -> None:
    prediction, target = torch.randn(3, 4, 8, 8, requires_grad=True), torch.randn(3, 4, 8, 8)
    weights = LossWeights(mse=0.5, norm_l2=2.0, cosine=3.0)
    error = (prediction - target).detach().pow(2).mean(dim=(1, 2, 3))  # each image's MSE
    norm_l2 = (error / (error + 1e-3).sqrt()).mean()
    # Cosine across the 4 channels at each of the 3 × 8 × 8 positions, by hand.
    dot = (prediction * target).sum(1)
    cosine = 1 - (dot / (prediction.norm(dim=1) * target.norm(dim=1))).mean()
    expected = 0.5 * F.mse_loss(prediction, target) + 2.0 * norm_l2 + 3.0 * cosine
    loss = prediction_loss(prediction, target, weights)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # norm_l2's gradient: each image's MSE gradient over its detached √(e + c), averaged over images.
    (grad,) = torch.autograd.grad(prediction_loss(prediction, target, LossWeights(mse=0, norm_l2=1)), prediction)
    by_hand = 2 * (prediction - target).detach() / prediction[0].numel() / (error + 1e-3).sqrt()[:, None, None, None] / 3
    assert torch.allclose(grad, by_hand, atol=1e-6)


def test_loss_weights_leave_something_to_learn() -> None:
    from pydantic import ValidationError

    assert LossWeights(mse=0, cosine=1).cosine == 1
    with pytest.raises(ValidationError, match="every loss weight is 0"):  # a loss of 0 would adapt nothing
        LossWeights(mse=0)
    with pytest.raises(ValidationError, match="expected a number, got the boolean true"):
        LossWeights(cosine=True)


@pytest.mark.parametrize(("shape", "count"), [((10,), 1), ((10,), 4), ((3, 7), 2), ((2, 1000), 6), ((3, 5), 5)])
def test_classes_are_torch_multinomials_draws_without_its_host_reads(shape: tuple[int, ...], count: int) -> None:
    """The same classes as torch.multinomial from the same stream (runs from before keep their
    draws), computed without the checks that make a GPU wait."""
    for seed in range(20):
        weights = torch.rand(shape, generator=torch.Generator().manual_seed(100 + seed)).softmax(dim=-1)
        expected = torch.multinomial(weights, count, replacement=False, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sample_without_replacement(weights, count, torch.Generator().manual_seed(seed)), expected)


def test_image_draws_do_not_depend_on_how_images_are_batched() -> None:
    like = torch.zeros(4, 3, 2, 2)
    probabilities = torch.rand(4, 10)
    whole = ImageDraws([11, 12, 13, 14], batch_key=5)
    halves = ImageDraws([11, 12], batch_key=5), ImageDraws([13, 14], batch_key=5)  # two processes' shards
    noise = whole.normal(like)
    assert torch.equal(noise, torch.cat([half.normal(like[:2]) for half in halves]))
    classes = whole.multinomial(probabilities, 3)
    assert torch.equal(classes, torch.cat([h.multinomial(p, 3) for h, p in zip(halves, probabilities.split(2))]))
    assert all(row.unique().numel() == 3 for row in classes)  # without replacement
    # The micro-batch's own draw (a timestep_range timestep) is the same in each shard.
    shared = whole.uniform(torch.device("cpu"))
    assert all(half.uniform(torch.device("cpu")) == shared for half in halves)
    # Images differ from each other, and a second draw in the same step differs from the first.
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise, whole.normal(like))
    assert whole.uniform(torch.device("cpu")) != whole.uniform(torch.device("cpu"))
    # An image's streams depend on the run's seed and on the task's name.
    assert len({task_key(0, "fog"), task_key(1, "fog"), task_key(0, "snow")}) == 3
    assert whole.uniform(torch.device("cpu")) != whole.uniform(torch.device("cpu"))
    assert ImageDraws([11], batch_key=6).uniform(torch.device("cpu")) != ImageDraws([11], batch_key=5).uniform(torch.device("cpu"))
    with pytest.raises(ValueError, match="keys"):
        ImageDraws([1], batch_key=1).normal(like)
