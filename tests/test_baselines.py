"""The baseline zoo (FitNets, CRD, DKD, RKD, DML, C2KD, MGDFR): one training step of each method, DKD's
weighted terms, CRD's memory bank, C2KD's filter, MGDFR's ranking, and a fast-dev-run of the shipped configs on
synthetic data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import AVDIGITS_ON_SYNTHETIC, REPO, random_batch
from crossmodal_kd.config import load_config, validate_config
from crossmodal_kd.methods.context import BuildContext
from crossmodal_kd.models.io import save_model
from crossmodal_kd.engine.trainer import Runner
from crossmodal_kd.methods.mgdfr import permutation_salience
from crossmodal_kd.registry import METHODS

N_TRAIN = 16
SHAPES = {"image": (1, 12, 12), "audio": (1, 16, 16)}
CNN = {"name": "small_cnn", "params": {"channels": [8, 16]}}
RAW = {
    "data": {"name": "synthetic"},
    "networks": {
        "student": {"name": "unimodal", "params": {"modality": "image", "encoder": CNN}},
        "fusion": {"name": "fusion", "params": {"encoders": {"image": CNN, "audio": CNN}, "hidden": 32}},
    },
    "stages": [{"name": "unused", "method": {"name": "supervised", "params": {"network": "student"}}}],
}


def make_batch(n: int = N_TRAIN, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_batch(SHAPES, n, seed)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> BuildContext:
    """A build context whose ``{path}`` refs point at a fresh fusion teacher and a fresh image reference."""
    tmp = tmp_path_factory.mktemp("baselines")
    torch.manual_seed(0)
    context = BuildContext(validate_config(RAW), tmp, SHAPES, 4, make_batch(), where="test")
    save_model(context.network("fusion"), tmp / "teacher.pt")
    save_model(context.network("student"), tmp / "reference.pt")
    return context


def build(ctx: BuildContext, name: str, **params) -> torch.nn.Module:
    params = {"student": "student", "teacher": {"path": str(ctx.run_dir / "teacher.pt")}, **params}
    torch.manual_seed(0)
    return METHODS.build(name, params, where="test", ctx=ctx)


def total_loss(method, batch) -> torch.Tensor:
    torch.manual_seed(1)  # the same CRD negatives in both evaluations
    return sum(method(batch)[1].values())


MGDFR = {"reference": None, "layer": "fusion", "remove_ratio": 0.5, "repeats": 1}
CASES = {
    "fitnets": ("fitnets", {}),
    "fitnets_hint_only": ("fitnets", {"hint_only": True, "w_hint": 1.0}),
    "fitnets_kd_only": ("fitnets", {"w_hint": 0.0, "w_kd": 1.0}),
    # momentum 1 keeps the banks fixed, so only the gradient step changes the loss (banks: tested below)
    "crd": ("crd", {"bank_size": N_TRAIN, "nce_k": 8, "feat_dim": 8, "momentum": 1.0}),
    "dkd": ("dkd", {"warmup": 1}),
    "rkd": ("rkd", {"w_kd": 1.0}),
    "c2kd": ("c2kd", {}),
    "mgdfr": ("mgdfr", MGDFR),
}


@pytest.mark.parametrize("case", CASES)
def test_one_training_step_reduces_the_loss(ctx, case):
    name, params = CASES[case]
    if name == "mgdfr":
        params = {**params, "reference": {"path": str(ctx.run_dir / "reference.pt")}}
    method = build(ctx, name, **params).train()
    batch = make_batch()
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01)
    before = total_loss(method, batch)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = total_loss(method, batch)
    assert after.item() < before.item()
    teacher = method.frozen_modules()["teacher"]
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_dkd_terms_are_the_weighted_tckd_and_nckd_after_warm_up(ctx):
    from crossmodal_kd.config import ConfigError
    from crossmodal_kd.losses import non_target_kl, target_kl

    batch = make_batch()
    method = build(ctx, "dkd", w_tckd=2.0, w_nckd=3.0, warmup=4, tau=2.0)
    method.on_epoch_start(1)  # warm-up factor (1 + 1) / 4
    out, losses = method(batch)
    assert set(losses) == {"ce", "tckd", "nckd"}  # w_kd defaults to 0: no plain KD term
    t_logits, y = method.teacher(batch)["logits"], batch["label"]
    torch.testing.assert_close(losses["tckd"], 0.5 * 2.0 * target_kl(out["logits"], t_logits, y, 2.0))
    torch.testing.assert_close(losses["nckd"], 0.5 * 3.0 * non_target_kl(out["logits"], t_logits, y, 2.0))
    with pytest.raises(ConfigError, match=r"^test\.alpha: renamed to w_tckd\ntest\.beta: renamed to w_nckd$"):
        build(ctx, "dkd", alpha=1.0, beta=8.0)


def test_fitnets_stages_have_the_terms_they_name(ctx):
    batch = make_batch()
    assert set(build(ctx, "fitnets", hint_only=True, w_hint=1.0)(batch)[1]) == {"hint"}
    kd_stage = build(ctx, "fitnets", w_hint=0.0, w_kd=1.0)
    assert set(kd_stage(batch)[1]) == {"ce", "kd"} and not hasattr(kd_stage, "regressor")


def test_crd_bank_rows_move_towards_the_batch_and_nothing_else(ctx):
    method = build(ctx, "crd", bank_size=2 * N_TRAIN, nce_k=8, feat_dim=8, momentum=0.5).train()
    batch = make_batch(4)
    batch["index"] = torch.tensor([3, 7, 8, 20])
    old_s, old_t = method.bank_s.clone(), method.bank_t.clone()
    with torch.no_grad():
        v_s = method.embed_s(method.student(batch)["features"])
        v_t = method.embed_t(method.teacher(batch)["features"])
        method(batch)
    idx = batch["index"]
    assert torch.allclose(method.bank_s[idx], F.normalize(0.5 * old_s[idx] + 0.5 * v_s, dim=1), atol=1e-6)
    assert torch.allclose(method.bank_t[idx], F.normalize(0.5 * old_t[idx] + 0.5 * v_t, dim=1), atol=1e-6)
    others = torch.ones(2 * N_TRAIN, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(method.bank_s[others], old_s[others]) and torch.equal(method.bank_t[others], old_t[others])
    # evaluation batches (other splits' indices) never touch the banks; the banks are checkpointed
    bank = method.bank_s.clone()
    with torch.no_grad():
        method.eval()(batch)
    assert torch.equal(method.bank_s, bank)
    assert {"bank_s", "bank_t", "z"} <= set(method.state_dict())
    with pytest.raises(IndexError, match="bank_size"):
        method(dict(batch, index=torch.tensor([0, 1, 2, 2 * N_TRAIN])))


def test_crd_positive_is_the_other_sides_bank_row_of_the_sample(ctx):
    method = build(ctx, "crd", bank_size=N_TRAIN, nce_k=8, feat_dim=8).train()
    batch = make_batch(4)
    with torch.no_grad():
        v_s = method.embed_s(method.student(batch)["features"])
    rows = torch.cat([batch["index"].unsqueeze(1), torch.zeros(4, 8, dtype=torch.long)], 1)
    scores = method._scores(v_s, method.bank_t, rows, 0)
    expected = torch.exp((method.bank_t[batch["index"]] * v_s).sum(1) / method.nce_t) / method.z[0]
    assert torch.allclose(scores[:, 0], expected, rtol=1e-5)


def test_crd_warmup_makes_the_first_epoch_ce_only_then_ramps_linearly(ctx):
    method = build(ctx, "crd", bank_size=N_TRAIN, nce_k=8, feat_dim=8, warmup_epochs=2).train()
    batch = make_batch()
    factors = []
    for epoch in range(4):
        method.on_epoch_start(epoch)
        factors.append(method.epoch_info()["crd_warmup"])
        crd = method(batch)[1]["crd"]
        assert (crd.item() == 0.0) == (epoch == 0)
    assert factors == [0.0, 0.5, 1.0, 1.0]


def _crd_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ctx = BuildContext(validate_config(RAW), Path(run_dir), SHAPES, 4, make_batch(), where="test")
        method = build(ctx, "crd", bank_size=N_TRAIN, nce_k=4, feat_dim=8).train()
        batch = make_batch(4, seed=rank)  # each process sees other samples
        batch["index"] = torch.arange(4) + 4 * rank
        with torch.no_grad():
            method(batch)
        torch.save({"bank_s": method.bank_s, "bank_t": method.bank_t}, Path(run_dir) / f"banks{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_crd_banks_stay_identical_across_processes(ctx):
    from conftest import free_port

    torch.multiprocessing.spawn(_crd_worker, args=(2, free_port(), str(ctx.run_dir)), nprocs=2)
    banks = [torch.load(ctx.run_dir / f"banks{r}.pt") for r in range(2)]
    initial = build(ctx, "crd", bank_size=N_TRAIN, nce_k=4, feat_dim=8)
    for key in ("bank_s", "bank_t"):
        assert torch.equal(banks[0][key], banks[1][key])
        changed = (banks[0][key] != getattr(initial, key)).any(1)
        assert changed.tolist() == [True] * 8 + [False] * (N_TRAIN - 8)  # both processes' rows, on both


def test_c2kd_keeps_samples_whose_non_target_rankings_agree(ctx):
    method = build(ctx, "c2kd", krc_threshold=0.0)
    labels = torch.tensor([0, 0, 3])
    proxy_s = torch.tensor([[9.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 0.0]])
    proxy_t = torch.tensor([[-5.0, 1.5, 2.5, 3.5], [0.0, 3.0, 2.0, 1.0], [1.0, 3.0, 2.0, 9.0]])
    # row 0: same non-target order (the target logit is ignored) -> tau 1; row 1: reversed -> -1;
    # row 2: non-targets (1, 2, 3) vs (1, 3, 2): 2 concordant, 1 discordant -> 1/3
    assert method.select(proxy_s, proxy_t, labels).tolist() == [1.0, 0.0, 1.0]
    stats = method.summarize_stats(method.pop_stats())
    assert stats["c2kd/kept"] == pytest.approx(2 / 3) and stats["c2kd/kendall"] == pytest.approx((1 - 1 + 1 / 3) / 3)
    assert method.select(proxy_s, proxy_t, labels).sum() == 2 and build(ctx, "c2kd", krc_threshold=0.5).select(
        proxy_s, proxy_t, labels
    ).tolist() == [1.0, 0.0, 0.0]


class ToyTeacher(nn.Module):
    """Three feature channels; only channel 1 reaches the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.feat.weight.copy_(torch.eye(3))
            self.feat.bias.zero_()
            self.head.weight.copy_(torch.tensor([[0.0, 5.0, 0.0], [0.0, -5.0, 0.0]]))
            self.head.bias.zero_()

    def forward(self, batch):
        f = self.feat(batch["x"])
        return {"logits": self.head(f), "features": f}


def test_mgdfr_salience_singles_out_the_decisive_channel():
    torch.manual_seed(0)
    teacher, batch = ToyTeacher().eval(), {"x": torch.randn(32, 3)}
    with torch.no_grad():
        reference = teacher(batch)["logits"]
    salience = permutation_salience(teacher, "feat", batch, reference, repeats=2)
    assert salience[1] > 1.0 and salience[0] == 0 and salience[2] == 0
    assert salience.argsort()[-1] == 1


def test_mgdfr_freezes_the_least_salient_channels_to_their_batch_mean(ctx):
    params = {**MGDFR, "reference": {"path": str(ctx.run_dir / "reference.pt")}}
    method = build(ctx, "mgdfr", **params)
    assert method.keep.sum() == 16 and len(method.keep) == 32  # fusion hidden 32, half removed
    assert method.salience[method.keep].min() >= method.salience[~method.keep].max()
    out = torch.randn(5, 32)
    frozen = method._freeze_removed(out)
    assert torch.equal(frozen[:, method.keep], out[:, method.keep])
    assert torch.allclose(frozen[:, ~method.keep], out[:, ~method.keep].mean(0, keepdim=True).expand(5, -1))


# ----------------------------------------------------------------------------- shipped configs

CONFIGS = REPO / "configs" / "avdigits"
NEW_CONFIGS = ["fitnets", "crd", "dkd", "rkd", "dml", "c2kd", "mgdfr"]


def fast_dev_run(config: Path, out: Path, *overrides: str) -> dict:
    return Runner(load_config(config, [*AVDIGITS_ON_SYNTHETIC, *overrides]), out, fast_dev_run=True, progress=False).run()


def test_all_baselines_fast_dev_run(tmp_path):
    metrics = fast_dev_run(CONFIGS / "baselines.yaml", tmp_path / "run", "stages.mgdfr.method.params.repeats=1")
    for stage in ("fitnets_hint", "fitnets", "dkd", "rkd", "dml", "c2kd", "mgdfr"):
        assert "student" in metrics["stages"][stage]["models"], stage


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_each_baseline_config_runs_alone(tmp_path, name):
    metrics = fast_dev_run(CONFIGS / f"{name}.yaml", tmp_path / name)
    assert name in metrics["stages"]
