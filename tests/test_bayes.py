"""Posterior-sampling helpers: schedule, sample collection, BMA, metrics, flatness probe, demo."""

import math

import pytest
import torch

from fsgld_fused import FSGLD, bayes


def _schedule(lr=0.1, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return opt, bayes.CyclicalCosineSchedule(opt, **kw)


def test_cyclical_schedule_and_sampling_window():
    opt, s = _schedule(total_steps=40, cycles=4, samples_per_cycle=3)
    lrs = []
    for _ in range(45):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    # the cSG-MCMC formula, cycle after cycle
    assert lrs == pytest.approx([0.1 / 2 * (math.cos(math.pi * (k % 10) / 10) + 1) for k in range(45)], rel=1e-12)
    assert lrs[0] == lrs[10] == 0.1 and lrs[5] == pytest.approx(0.05) and lrs[9] < 0.003
    assert [k for k in range(45) if s.sample_now(k)] == [7, 8, 9, 17, 18, 19, 27, 28, 29, 37, 38, 39]
    with pytest.raises(ValueError):
        _schedule(total_steps=40, cycles=4, samples_per_cycle=11)


def test_cyclical_schedule_resumes_from_its_state_dict():
    opt, s = _schedule(total_steps=40, cycles=4)
    for _ in range(13):
        opt.step()
        s.step()
    opt2, s2 = _schedule(total_steps=40, cycles=4)
    s2.load_state_dict(s.state_dict())
    opt2.load_state_dict(opt.state_dict())
    for _ in range(10):
        for o, sch in ((opt, s), (opt2, s2)):
            o.step()
            sch.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert s2.last_epoch == 23 and s2.sample_now(27) and not s2.sample_now(26)


@pytest.mark.parametrize("on_disk", [False, True])
def test_collector_burn_in_thinning_and_clean_weights(on_disk, tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = FSGLD(model.parameters(), lr=1e-2, beta=1e4, sigma=0.1, seed=1)
    col = bayes.SampleCollector(burn_in=4, thin=3, directory=str(tmp_path) if on_disk else None)
    kept = []
    for k in range(12):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        if col.maybe_add(k, model, opt):
            kept.append(k)
            with opt.unperturbed():
                clean = model.weight.detach().clone()
            assert opt.is_perturbed  # collecting put the perturbation back
            last = clean
    assert kept == [4, 7, 10] and len(col) == 3
    samples = list(col)
    assert torch.equal(samples[-1]["weight"], last)


def test_bma_averages_probabilities_not_logits():
    model = torch.nn.Linear(1, 2, bias=False)
    s1 = {"weight": torch.tensor([[10.0], [0.0]])}
    s2 = {"weight": torch.tensor([[0.0], [10.0]])}
    x = torch.ones(1, 1)
    before = model.weight.detach().clone()
    lp = bayes.bma_log_probs(model, [s1, s2], x)
    torch.testing.assert_close(lp.exp(), torch.tensor([[0.5, 0.5]]), atol=1e-4, rtol=0)
    assert torch.equal(model.weight, before)
    with pytest.raises(ValueError, match="weight"):  # a sample that misses a weight is an error
        bayes.bma_log_probs(model, [{}], x)
    # a non-persistent buffer (never in a state_dict, so never in a sample) is the model's own
    model.register_buffer("shift", torch.zeros(2), persistent=False)
    model.register_forward_hook(lambda m, inp, out: out + m.shift)
    torch.testing.assert_close(bayes.bma_log_probs(model, [s1, s2], x), lp)
    # a diverged sample's row is NaN, not an error
    assert bayes.predictive_entropy(torch.tensor([[float("nan"), 0.0], [0.0, 0.0]])).isnan().tolist() == [True, False]


def test_metrics_on_known_values():
    lp = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]))
    y = torch.tensor([0, 1, 1])
    assert bayes.accuracy(lp, y) == pytest.approx(2 / 3)
    assert bayes.nll(lp, y) == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4)) / 3, rel=1e-6)
    assert bayes.brier(lp, y) == pytest.approx((0.02 + 0.08 + 0.72) / 3, rel=1e-5)
    # bins: 0.9 (correct), 0.8 (correct), 0.6 (wrong) -> (0.1 + 0.2 + 0.6) / 3
    assert bayes.ece(lp, y) == pytest.approx(0.3, rel=1e-5)
    # bins are (lo, hi]: 0.5 (correct) alone in (0, 0.5], 0.75 (wrong) in (0.5, 1] -> (0.5 + 0.75) / 2
    assert bayes.ece(torch.log(torch.tensor([[0.5, 0.5], [0.75, 0.25]])), torch.tensor([0, 1]), bins=2) == 0.625
    assert bayes.auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == 1.0
    assert bayes.auroc(torch.tensor([0.1, 0.5]), torch.tensor([0.3, 0.5])) == pytest.approx(0.625)
    ent = bayes.predictive_entropy(torch.log(torch.tensor([[0.5, 0.5], [1.0, 1e-30]])))
    assert ent[0].item() == pytest.approx(math.log(2)) and ent[1].item() == pytest.approx(0.0, abs=1e-6)


def test_metrics_agree_with_scikit_learn_and_torchmetrics():
    sklearn = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(2 * torch.randn(4000, 5, generator=gen, dtype=torch.float64), -1)
    y = torch.randint(0, 5, (4000,), generator=gen)
    p = lp.exp().numpy()
    assert bayes.nll(lp, y) == pytest.approx(sklearn.log_loss(y.numpy(), p, labels=range(5)), rel=1e-9)
    assert bayes.brier(lp, y) == pytest.approx(sklearn.brier_score_loss(y.numpy(), p, labels=range(5)), rel=1e-9)
    assert bayes.accuracy(lp, y) == pytest.approx(sklearn.accuracy_score(y.numpy(), p.argmax(-1)), rel=1e-7)
    # scores with many ties: the tie rule matters
    s_in = torch.randint(0, 50, (3000,), generator=gen).double()
    s_out = torch.randint(10, 60, (2000,), generator=gen).double()
    expect = sklearn.roc_auc_score([0] * 3000 + [1] * 2000, torch.cat([s_in, s_out]).numpy())
    assert bayes.auroc(s_in, s_out) == pytest.approx(expect, rel=1e-12)
    assert bayes.auroc(s_out, s_in) == pytest.approx(1 - expect, rel=1e-12)
    ent = bayes.predictive_entropy(lp)
    torch.testing.assert_close(ent, -(lp.exp() * lp).sum(-1))
    tm = pytest.importorskip("torchmetrics.functional.classification")  # not a dependency: where installed
    expect = tm.multiclass_calibration_error(lp.exp().float(), y, num_classes=5, n_bins=15, norm="l1").item()
    assert bayes.ece(lp, y) == pytest.approx(expect, abs=1e-6)


def test_flatness_probe_on_a_known_quadratic():
    diag = torch.tensor([5.0, 1.0, 0.5, 3.0])
    w = torch.nn.Parameter(torch.randn(4))

    def loss():
        return 0.5 * (diag * w * w).sum()

    # Rademacher probes are exact for a diagonal Hessian
    assert bayes.hutchinson_trace(loss, [w], samples=4) == pytest.approx(diag.sum().item(), rel=1e-5)
    assert bayes.top_hessian_eigenvalue(loss, [w], iters=200, tol=1e-7) == pytest.approx(5.0, rel=1e-3)


def test_demo_runs_and_reports(capsys):
    from fsgld_fused import demo

    x_tr, y_tr, x_te, y_te, x_ood = demo.load_digits_split()
    assert set(y_tr.tolist()) == {0, 1, 2, 3, 4} and len(x_ood) > 800
    # stratified: each class split 60/40 to within one example
    n_tr, n_te = torch.bincount(y_tr), torch.bincount(y_te)
    assert ((n_tr - 0.6 * (n_tr + n_te)).abs() <= 1).all(), (n_tr, n_te)
    noisy = demo.noisy_labels(y_tr, 0.4, 5, torch.Generator().manual_seed(0))
    assert 0.3 < (noisy != y_tr).float().mean().item() < 0.5
    model, samples, _ = demo.train("fSGLD", x_tr, y_tr, 0, epochs=4, lr=0.05)
    assert len(samples) == 12
    row = demo.evaluate(model, samples, x_tr, y_tr, x_te, y_te, x_ood, probe_samples=2)
    assert row["acc"] > 0.5 and 0.5 < row["auroc"] <= 1.0 and row["trH"] > 0
