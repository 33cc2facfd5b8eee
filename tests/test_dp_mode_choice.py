"""DP-SGD's grad_sample_mode: book-keeping clipping (bk) against a brute-force per-example computation, auto's
deterministic choice, the manual override, and the mode recorded in the client metrics and the privacy block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.defenses.bk_clipping import BookKeeping
from fedsim.defenses.dp_modes import bk_optimizer_class, bk_problem, choose_mode
from fedsim.defenses.dp_sgd import DPSGD, DPSGDParams
from fedsim.models import MaskDropout, build_model
from fedsim.privacy.summary import dp_sgd_summary
from fedsim.scenario import LocalTraining, ModelSpec
from fedsim.training import TrainingJob

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning"),
]


class _Image(nn.Module):
    """Conv2d through both of bk's branches (per-example grads on 8x8, ghost norms on a 1x1 output), GroupNorm,
    an in-place activation after a layer, a bias-free conv and a Linear on (B, d)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.gn = nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.c2 = nn.Conv2d(4, 6, 2, stride=2, bias=False)
        self.c3, self.fc = nn.Conv2d(6, 40, 3, stride=2), nn.Linear(40, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.c3(F.relu(self.c2(torch.relu_(self.gn(self.c1(x))))))).flatten(1))


class _Tokens(nn.Module):
    """Embedding (padding row, repeated tokens), LayerNorm and Linear on (B, T, d) through both branches."""

    vocab_size = 7  # token ids in: fedsim.models.base.zero_inputs

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.ln = nn.Embedding(7, 8, padding_idx=0), nn.LayerNorm(8)
        self.l1, self.l2 = nn.Linear(8, 30), nn.Linear(30, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(self.ln(self.emb(x))))).mean(1)


class _Tied(nn.Module):
    """The embedding's weight reused outside its layer (a tied head): bk cannot see that use."""

    vocab_size = 7

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.emb(x) @ self.emb.weight.t()).mean(1)


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _one_at_a_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float) -> tuple[list, list]:
    """The reference: each example's gradient by its own backward pass, clipped as Opacus does, summed (float64)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total, norms = [torch.zeros_like(p, dtype=torch.float64) for p in params], []
    for i in range(len(x)):
        grads = torch.autograd.grad(_ce(model(x[i:i + 1]), y[i:i + 1]).sum(), params)
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
        norms.append(float(norm))
        for t, g in zip(total, grads, strict=True):
            t += g.double() * min(1.0, c / (float(norm) + 1e-6))
    return total, norms


@pytest.mark.parametrize("make", [_Image, _Tokens])
@pytest.mark.parametrize("c", [1e6, 0.05])
def test_bk_clipped_sum_equals_one_example_at_a_time(make, c: float) -> None:
    torch.manual_seed(0)
    model = make()
    x = torch.randn(5, 3, 8, 8) if make is _Image else torch.tensor([[1, 1, 0, 2, 3, 1], [4, 5, 6, 6, 0, 0],
                                                                   [2, 2, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3],
                                                                   [6, 5, 4, 3, 2, 1]])
    y = torch.randint(0, 5 if make is _Image else 3, (5,))
    ref, ref_norms = _one_at_a_time(model, x, y, c)
    bk = BookKeeping(model, c)
    norms = bk.clip_backward(_ce(model(x), y))
    bk.cleanup()
    assert norms.tolist() == pytest.approx(ref_norms, rel=1e-5)
    if c < 1:
        assert min(ref_norms) > c  # the clipping was active for every example
    for p, r in zip(model.parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad.double(), r, rtol=1e-5, atol=1e-7)


def test_bk_refuses_a_weight_used_outside_its_layer_and_auto_then_takes_hooks() -> None:
    assert "differs from the per-example one" in bk_problem(_Tied(), (4,))
    assert choose_mode(_Tied(), (4,), _ce, audited=False) == "hooks"
    assert bk_problem(_Tokens(), (6,)) is None


def _round(name: str, mode: str, sigma: float = 0.0, loss=F.cross_entropy, dropout: float = 0.0,
           masks: int = 0) -> tuple[list, dict, str]:
    """One fedsgd DP-SGD round of ``name`` on a fixed batch (dropout masks drawn from seed ``masks``): the released
    gradient, the client's metrics, the mode."""
    shape = (3, 16, 16)
    model = build_model(ModelSpec(name=name, width=8, dropout=dropout), shape, 10, seed=0)
    defense = DPSGD(DPSGDParams(noise_multiplier=sigma, max_grad_norm=0.05, grad_sample_mode=mode), "dp_sgd")
    model = defense.transform_model(model)
    defense.check_model(model, shape)
    job = defense.wrap_training(TrainingJob(model, loss_fn=loss, seed=3, round=1, partition_id=0, num_examples=40))
    local = LocalTraining(batch_size=6, lr=0.1, steps=1)
    job.sample_batches(40, local, "fedsgd", torch.Generator().manual_seed(0))
    opt = job.make_optimizer(job.model, local)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn((6, *shape), generator=gen), torch.randint(0, 10, (6,), generator=gen)
    opt.zero_grad(set_to_none=True)
    torch.manual_seed(masks)
    job.loss_fn(job.model(x), y).backward()
    job.before_read_gradients(opt)
    metrics = job.on_finish[0](1, [6])
    ran = [k.split("/", 1)[1] for k in metrics if k.startswith("grad_sample_mode/")]
    assert len(ran) == 1
    return [p.grad.clone() for p in model.parameters()], metrics, ran[0]


def test_auto_picks_an_eligible_mode_records_it_and_the_override_is_kept() -> None:
    ref, _, ran = _round("lenet", "hooks")
    assert ran == "hooks"
    auto, metrics, ran = _round("lenet", "auto")
    assert ran == "bk"  # every LeNet weight is in a Conv2d or Linear: book-keeping applies
    for a, r in zip(auto, ref, strict=True):  # the same mechanism (clip per example, sum): equal up to rounding
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-7)
    assert _round("lenet", "ghost")[2] == "ghost"  # a manual mode is run as given
    assert _round("vit", "auto")[2] == "hooks"  # the ViT's class token sits outside any bk layer

    def no_reduction(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    assert _round("lenet", "auto", loss=no_reduction)[2] == "hooks"  # bk needs the per-example loss
    summary = dp_sgd_summary({1: {0: metrics, 1: metrics}})
    assert summary["grad_sample_mode"] == "bk"


class _Stochastic(nn.Module):
    """Randomness in train mode the probe must switch off to compare like with like: torch's Dropout2d, fedsim's
    MaskDropout and a functional dropout tied to ``self.training`` (no module to find)."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.drop2d = nn.Conv2d(3, 4, 3, stride=2), nn.Dropout2d(0.5)
        self.fc, self.mask = nn.Linear(36, 5), MaskDropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mask(F.relu(self.drop2d(self.c(x))).flatten(1))
        return self.fc(F.dropout(h, 0.3, training=self.training))


class _NoisyEvenInEval(nn.Module):
    """Noise in every mode: nothing the probe can switch off."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x + torch.randn_like(x))


def test_bk_probe_compares_like_with_like_under_dropout_and_training_keeps_it() -> None:
    lenet = build_model(ModelSpec(name="lenet", width=8, dropout=0.5), (3, 16, 16), 10, seed=0)
    assert bk_problem(lenet, (3, 16, 16)) is None  # old code: "differs from the per-example one" (masks differed)
    assert choose_mode(lenet, (3, 16, 16), F.cross_entropy, audited=False) == "bk"
    assert all(m.training for m in lenet.modules())  # the probe ran on a copy
    assert bk_problem(_Stochastic(), (3, 8, 8)) is None
    assert "random even in eval mode" in bk_problem(_NoisyEvenInEval(), (12,))
    # the round itself still drops: bk releases what hooks releases for the same masks, another mask draw differs
    bk, _, ran = _round("lenet", "auto", dropout=0.5, masks=1)
    assert ran == "bk"
    for a, r in zip(bk, _round("lenet", "hooks", dropout=0.5, masks=1)[0], strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(a, b) for a, b in zip(bk, _round("lenet", "bk", dropout=0.5, masks=2)[0],
                                                         strict=True))


def test_bk_probe_runs_once_per_architecture_until_the_run_caches_are_emptied(monkeypatch) -> None:
    from fedsim.defenses import dp_modes
    from fedsim.run_caches import clear_run_caches

    probes = []
    probe = dp_modes._probe_bk
    monkeypatch.setattr(dp_modes, "_probe_bk", lambda m, s: probes.append(s) or probe(m, s))
    clear_run_caches()
    for _ in range(2):  # a defense per process (validation, setup) and per client round: one probe
        assert choose_mode(_Tokens(), (6,), F.cross_entropy, audited=False) == "bk"
    assert "differs from the per-example one" in bk_problem(_Tied(), (6,))  # another architecture: its own probe
    assert len(probes) == 2
    clear_run_caches()  # a new benchmark cell pays it again
    bk_problem(_Tokens(), (6,))
    assert len(probes) == 3


def test_bk_optimizer_releases_opacus_own_noisy_gradient_bit_for_bit() -> None:
    from opacus.optimizers import DPOptimizerFastGradientClipping

    out = []
    for cls in (DPOptimizerFastGradientClipping, bk_optimizer_class()):
        torch.manual_seed(0)
        m = nn.Linear(50, 7)
        opt = cls(torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.3, max_grad_norm=0.7,
                  expected_batch_size=5, loss_reduction="mean", generator=torch.Generator().manual_seed(3))
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            m(torch.randn(5, 50)).sum().backward()
            opt.step()
        out.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*out, strict=True))
