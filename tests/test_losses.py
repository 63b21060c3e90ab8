import math

import pytest
import torch

from gencnp.pathways import losses as LS

torch.manual_seed(0)
B, K, D = 6, 4, 7


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def test_kd_matches_loop_reference():
    logits, masked = torch.randn(B, K, dtype=torch.float64), torch.randn(B, K, dtype=torch.float64)
    y = logits.argmax(1)
    t = 3.0
    ref = 0.0
    for i in range(B):
        p = _softmax((logits[i] / t).tolist())
        q = _softmax((masked[i] / t).tolist())
        kl = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
        ce = -math.log(_softmax(masked[i].tolist())[int(y[i])])
        ref += t * t * kl + ce
    assert abs(float(LS.kd(logits, masked, y, t)) - ref / B) < 1e-10


def test_sparsity_gate_and_tap_mean():
    scores = [torch.rand(B, 3, dtype=torch.float64), torch.rand(B, 5, dtype=torch.float64)]
    gate = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.float64)
    ref = (
        sum(gate[i] * 0.5 * (sum(scores[0][i].tolist()) / 3 + 2 * sum(scores[1][i].tolist()) / 5) for i in range(B)) / B
    )
    assert abs(float(LS.sparsity(scores, gate, [1.0, 2.0])) - float(ref)) < 1e-12


def test_sparsity_per_channel_is_expected_kept_fraction():
    scores = [torch.rand(B, 3, dtype=torch.float64), torch.rand(B, 5, dtype=torch.float64)]
    ref = sum((sum(scores[0][i].tolist()) + 2 * sum(scores[1][i].tolist())) / 8 for i in range(B)) / B
    assert abs(float(LS.sparsity(scores, None, [1.0, 2.0], per="channel")) - ref) < 1e-12
    with pytest.raises(ValueError, match="'tap' or 'channel'"):
        LS.sparsity(scores, per="pixel")


def test_dependence_gate_stops_pressure_on_forcing_pathways():
    # p(class 0) on the other input: 0.88, 0.5, 0.12 -> only the last passes at max_prob 0.3.
    swapped = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 0, 0])
    assert LS.dependence_gate(swapped, y, 0.3).tolist() == [0.0, 0.0, 1.0]
    assert LS.dependence_gate(swapped, y, 0.6).tolist() == [0.0, 1.0, 1.0]
    # a same-class pair (not valid) never blocks the pressure
    assert LS.dependence_gate(swapped, y, 0.3, torch.tensor([False, True, True])).tolist() == [1.0, 0.0, 1.0]


def test_faithful_gate_margin():
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    masked = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 0])
    assert LS.faithful_gate(logits, masked, y, 0.9).tolist() == [1.0, 0.0]
    # top_margin: the masked output must also keep y on top by that many nats
    lg = torch.tensor([[0.0, 0.0, -5.0]])
    ms = torch.tensor([[0.1, 0.0, -5.0]])  # ratio fine, y on top by 0.1 nats
    y0 = torch.tensor([0])
    assert LS.faithful_gate(lg, ms, y0, 0.9).tolist() == [1.0]
    assert LS.faithful_gate(lg, ms, y0, 0.9, top_margin=0.0).tolist() == [1.0]
    assert LS.faithful_gate(lg, ms, y0, 0.9, top_margin=0.5).tolist() == [0.0]


def test_swap_matches_loop_reference():
    swapped = torch.randn(B, K, dtype=torch.float64)
    y = torch.randint(0, K, (B,))
    valid = torch.tensor([True, False, True, True, True, False])
    ref = [-math.log(1 - _softmax(swapped[i].tolist())[int(y[i])]) for i in range(B) if valid[i]]
    assert abs(float(LS.swap(swapped, y, valid)) - sum(ref) / len(ref)) < 1e-10
    # Stable where p is close to 1.
    huge = torch.tensor([[60.0, 0.0]], dtype=torch.float64)
    assert math.isfinite(float(LS.swap(huge, torch.tensor([0]))))


def test_cls_matches_loop_reference():
    logits, g = torch.randn(B, K, dtype=torch.float64), torch.randn(B, K, dtype=torch.float64)
    y = logits.argmax(1)
    ref = 0.0
    for i in range(B):
        p, q = _softmax(logits[i].tolist()), _softmax(g[i].tolist())
        ref += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)) - math.log(q[int(y[i])])
    assert abs(float(LS.cls(logits, g, y)) - ref / B) < 1e-10


def test_con_and_prototype_update():
    scores = torch.rand(B, D, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    protos = torch.zeros(K, D, dtype=torch.float64)
    seen = torch.zeros(K, dtype=torch.bool)
    LS.update_prototypes(protos, seen, scores, y, momentum=0.5)
    assert torch.allclose(protos[0], scores[[0, 2, 5]].mean(0).to(protos.dtype), atol=1e-6)
    assert seen.tolist() == [True, True, True, False] and torch.equal(protos[3], torch.zeros(D, dtype=torch.float64))
    first = protos[0].clone()
    LS.update_prototypes(protos, seen, scores, torch.zeros(B, dtype=torch.long), momentum=0.5)
    assert torch.allclose(protos[0], 0.5 * first + 0.5 * scores.mean(0).to(protos.dtype), atol=1e-6)
    ref = sum(abs(float(scores[i, c]) - float(protos[y[i], c])) for i in range(B) for c in range(D)) / (B * D)
    assert abs(float(LS.con(scores, protos, y)) - ref) < 1e-10


def test_prototype_update_all_reduces_before_update():
    calls = []

    def fake_reduce(t):
        calls.append(t.shape)
        return t * 2  # as if a second process held the same batch

    protos, seen = torch.zeros(2, 3), torch.zeros(2, dtype=torch.bool)
    LS.update_prototypes(protos, seen, torch.ones(4, 3), torch.tensor([0, 0, 1, 1]), all_reduce=fake_reduce)
    assert calls == [(2, 4)] and torch.allclose(protos, torch.ones(2, 3))


def test_total_loss_weights_terms():
    terms = {"kd": torch.tensor(1.0), "sparsity": torch.tensor(2.0), "swap": torch.tensor(3.0)}
    out = LS.total_loss(terms, {"sparsity": 0.5, "swap": 0.0})
    assert float(out["loss"]) == 2.0 and set(out) == {"kd", "sparsity", "swap", "loss"}


def _hard_partners_reference(y_hat, logits):
    b = len(y_hat)
    out = []
    for i in range(b):
        runner_up = int(logits[i].topk(2).indices[1])
        j = next((k % b for k in range(i + 1, i + 1 + b) if int(y_hat[k % b]) == runner_up), (i + 1) % b)
        out.append(j)
    return out


def test_hard_partners_pick_the_next_sample_of_the_runner_up_class():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        logits = torch.randn(17, 5, generator=g)
        y_hat = torch.randint(0, 5, (17,), generator=g)
        idx, valid = LS.partners(y_hat, logits)
        assert idx.tolist() == _hard_partners_reference(y_hat, logits)
        assert torch.equal(valid, y_hat[idx] != y_hat)
    # no sample of the runner-up class in the batch: fall back to the next sample
    logits = torch.tensor([[5.0, 3.0, 0.0], [0.0, 5.0, 3.0]])
    idx, _ = LS.partners(torch.tensor([0, 1]), logits)
    assert idx.tolist() == [1, 0]


def test_roll_partners_are_the_next_sample():
    idx, valid = LS.partners(torch.tensor([0, 0, 1]))
    assert idx.tolist() == [1, 2, 0] and valid.tolist() == [False, True, True]
