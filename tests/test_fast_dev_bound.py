"""A bounded ``--fast-dev-run`` (build-time work capped), the one-process launch warning, ``--no-progress``."""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, read_json
from test_data import write_avmnist
from tiny_text import make_tiny_bert

from crossmodal_kd.cli import main
from crossmodal_kd.config import load_config, validate_config
from crossmodal_kd.data.synthetic import Synthetic
from crossmodal_kd.engine import launch
from crossmodal_kd.methods.context import BuildContext, FAST_DEV_SAMPLES, FAST_DEV_SCAN_BATCHES
from crossmodal_kd.models.io import save_model
from crossmodal_kd.engine.trainer import make_accelerator
from crossmodal_kd.methods import wordnet_clip
from crossmodal_kd.methods.mgdfr import permutation_salience
from crossmodal_kd.models.networks import build_network
from crossmodal_kd.registry import METHODS

SHAPES = {"image": (1, 12, 12), "audio": (1, 8, 8)}
CNN = {"name": "small_cnn", "params": {"channels": [4, 8]}}
RAW = {
    "data": {"name": "synthetic"},
    "networks": {"student": {"name": "unimodal", "params": {"modality": "image", "encoder": CNN}}},
    "stages": [{"name": "s", "method": {"name": "supervised", "params": {"network": "student"}}}],
}


def make_ctx(run_dir: Path, fast: bool, n_train: int = 200) -> BuildContext:
    data = Synthetic("unused", num_classes=4, n_train=n_train, n_val=8, n_test=8,
                     image_shape=SHAPES["image"], audio_shape=SHAPES["audio"]).load()
    batch = data.train.__getitems__(list(range(100)))
    return BuildContext(validate_config(RAW), run_dir, SHAPES, 4, batch, where="test", num_train=n_train,
                        class_names=["dog", "cat", "seven", "tree"], train_data=data.train, fast_dev_run=fast)


# ----------------------------------------------------------------------------- item 3: build-time bounds


def test_fast_dev_context_bounds_probe_batch_scans_and_counts(tmp_path):
    fast, full = make_ctx(tmp_path, True), make_ctx(tmp_path, False)
    assert all(len(v) == FAST_DEV_SAMPLES for v in fast.sample_batch.values())
    assert all(len(v) == 100 for v in full.sample_batch.values())
    assert [len(b["label"]) for b in fast.train_batches(64)] == [FAST_DEV_SAMPLES] * FAST_DEV_SCAN_BATCHES
    assert [len(b["label"]) for b in full.train_batches(64)] == [64, 64, 64, 8]
    assert (fast.bound(3, 1), fast.bound(None, 8), fast.bound(5, 8)) == (1, 8, 5)
    assert (full.bound(3, 1), full.bound(None, 8)) == (3, None)


class Channels(torch.nn.Module):
    """Ten feature channels, each reaching the logits with a different weight; counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = torch.nn.Identity()
        self.head = torch.nn.Linear(10, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.arange(10.0).repeat(2, 1) * torch.tensor([[1.0], [-1.0]]))
        self.passes = 0

    def forward(self, batch):
        self.passes += 1
        return {"logits": self.head(self.feat(batch["x"]))}


def test_salience_max_passes_scores_channel_groups_in_bounded_passes():
    net, batch = Channels(), {"x": torch.randn(64, 10)}
    reference = net(batch)["logits"]
    torch.manual_seed(0)
    exact = permutation_salience(net, "feat", batch, reference)
    torch.manual_seed(0)
    assert torch.equal(permutation_salience(net, "feat", batch, reference, max_passes=10), exact)
    net.passes = 0
    coarse = permutation_salience(net, "feat", batch, reference, repeats=2, max_passes=4)
    assert net.passes == 1 + 2 * 4  # one shape probe, then 4 groups per repeat
    groups = [coarse[0:3], coarse[3:6], coarse[6:9], coarse[9:10]]  # torch.chunk's contiguous groups
    assert all(torch.all(g == g[0]) for g in groups)
    assert coarse[9] > coarse[0] > 0  # the heavier channels still rank higher


def test_wordnet_clip_fast_dev_samples_the_pool_and_bounds_kmeans(tmp_path, monkeypatch):
    words = ["dog", "cat", "seven", "tree"]
    ctx = make_ctx(tmp_path, True)
    tiny_bert = str(make_tiny_bert(tmp_path / "tiny_bert", words=words))
    torch.manual_seed(0)
    align = METHODS.build("align_to_text", {"image": {"encoder": CNN}, "text": {"model": tiny_bert},
                                            "templates": ["a photo of the {}."]}, where="test", ctx=ctx)
    save_model(align.model, tmp_path / "align.pt")
    seen = {}

    def spy(images, nouns, embeddings, **kwargs):
        seen.update(images=len(images), nouns=len(nouns), **kwargs)
        return real(images, nouns, embeddings, **kwargs)

    real = wordnet_clip.filter_nouns_by_images
    monkeypatch.setattr(wordnet_clip, "filter_nouns_by_images", spy)
    params = {"backend": {"name": "text_aligned", "params": {"image_model": str(tmp_path / "align.pt")}},
              "pool": {"source": "all"}, "filtering": {"k": 150, "top_m": 2}, "teacher": {"hidden": 16},
              "cache_dir": str(tmp_path / "nouns")}
    method = METHODS.build("wordnet_clip", params, where="test", ctx=ctx)  # all of WordNet, unbounded
    assert method.noun_counts["nouns/pool"] == wordnet_clip.FAST_DEV_NOUNS
    assert seen == {"images": FAST_DEV_SAMPLES * FAST_DEV_SCAN_BATCHES, "nouns": wordnet_clip.FAST_DEV_NOUNS,
                    "k": wordnet_clip.FAST_DEV_CLUSTERS, "iters": wordnet_clip.FAST_DEV_KMEANS_ITERS, "top_m": 2}
    assert 0 < method.noun_counts["nouns/kept"] <= wordnet_clip.FAST_DEV_CLUSTERS * 2


def supervised_step_seconds(cfg, network: str, shapes: dict, num_classes: int, steps: int = 3) -> float:
    """Median wall time of one CE training step (AdamW) of ``networks.<network>`` at the config's batch size."""
    spec = cfg.network(network)
    net = build_network(spec.name, dict(spec.params), shapes, num_classes, where=network)
    opt = torch.optim.AdamW(net.parameters())
    bs = cfg.data.batch_size
    batch = {m: torch.randn(bs, *s) for m, s in shapes.items()}
    labels = torch.randint(num_classes, (bs,))
    times = []
    for i in range(steps + 1):  # a warm-up step first
        t0 = time.perf_counter()
        loss = F.cross_entropy(net(batch)["logits"], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.fixture
def hf_progress():
    """transformers' and huggingface_hub's progress-bar switches (on before the test, and again after it)."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    enable_progress_bars()
    yield lambda: (hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled())
    hf_logging.enable_progress_bar()
    enable_progress_bars()


@pytest.mark.slow
def test_shipped_compare_fast_dev_run_is_bounded_in_training_steps(tmp_path, hf_progress):
    """``configs/avdigits/compare.yaml --fast-dev-run`` (21 stages) on an AV-MNIST-layout set (112 x 112 audio),
    timed in units of one training step of its multimodal teacher (the largest network it trains, the one
    that reads the audio) at the config's batch size, so the bound holds on slow and busy machines alike.

    Measured on 2 busy CPU cores, the bounded run costs ~40 such steps: 2 training batches per stage (36
    steps), evaluations of the small val/test splits, build-time work capped (32-row probe batch, MGDFR
    salience in 8 passes: ~1 step). Unbounded, MGDFR's salience alone (3 x 128 forward passes over 512
    rows) cost ~640 steps; 300 leaves room for per-stage overheads (model files, checkpoints, plots) that
    do not shrink with the step on a fast machine, and still fails that."""
    write_avmnist(tmp_path / "data", n_train=300, n_test=100, classes=10)
    config = REPO / "configs" / "avdigits" / "compare.yaml"
    overrides = ["data.name=avmnist", f"data.root={tmp_path / 'data'}"]
    cfg = load_config(config, overrides)
    shapes = {"image": (1, 28, 28), "audio": (1, 112, 112)}
    before = supervised_step_seconds(cfg, "multimodal_teacher", shapes, 10)
    started = time.perf_counter()
    argv = ["run", str(config), "--fast-dev-run", "--no-progress", "--output-dir", str(tmp_path / "run")]
    assert main([*argv, *(a for o in overrides for a in ("--set", o))]) == 0
    elapsed = time.perf_counter() - started
    step = (before + supervised_step_seconds(cfg, "multimodal_teacher", shapes, 10)) / 2  # load drifts
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert list(metrics["stages"]) == [s.name for s in cfg.stages] and len(cfg.stages) == 21
    for stage in cfg.stages:
        assert (tmp_path / "run" / "stages" / stage.name / "result.json").is_file(), stage.name
    assert elapsed / step < 300, f"fast-dev-run took {elapsed:.0f} s = {elapsed / step:.0f} training steps of {step:.2f} s"


# ----------------------------------------------------------------------------- item 9: one process started

SIMPLE_LAUNCH = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no"}
LAUNCHER = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "tools/train.py", "c.yaml"]


def test_launch_mismatch_names_the_requested_count_and_the_working_command():
    message = launch.launch_mismatch(1, SIMPLE_LAUNCH, LAUNCHER)
    assert "\n" not in message
    assert message.startswith("accelerate launch asked for 2 processes but started 1 (Accelerate's multi-CPU path needs MPI)")
    assert "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...`" in message
    argv = [a for a in LAUNCHER if a not in ("--num_processes", "2")]
    assert "asked for 4 processes" in launch.launch_mismatch(1, SIMPLE_LAUNCH, [*argv[:4], "--num_processes=4", *argv[4:]])
    assert "asked for several processes" in launch.launch_mismatch(1, SIMPLE_LAUNCH, [])  # e.g. from a config file


@pytest.mark.parametrize("world_size, env, argv", [
    (2, {**SIMPLE_LAUNCH, "WORLD_SIZE": "2"}, LAUNCHER),  # torchrun (--multi_gpu): really two processes
    (1, {**SIMPLE_LAUNCH, "PMI_SIZE": "1"}, LAUNCHER),  # mpirun tells the world size itself
    (1, {k: v for k, v in SIMPLE_LAUNCH.items() if k != "MASTER_ADDR"}, []),  # accelerate launch of one process
    (1, {"MASTER_ADDR": "10.0.0.1"}, []),  # not started by accelerate launch
    (1, SIMPLE_LAUNCH, [*LAUNCHER[:4], "--num_processes", "1", "--num_machines", "2"]),  # one asked, one started
])
def test_launch_mismatch_is_silent_when_the_world_size_is_what_was_asked(world_size, env, argv):
    assert launch.launch_mismatch(world_size, env, argv) is None


def test_make_accelerator_warns_once_under_a_one_process_launch(monkeypatch, caplog):
    for key, value in SIMPLE_LAUNCH.items():
        monkeypatch.setenv(key, value)
    for key in launch.WORLD_SIZE_VARS:
        monkeypatch.delenv(key, raising=False)
    launch._warn.cache_clear()
    cfg = validate_config({**RAW, "accelerator": {"cpu": True}})
    with caplog.at_level(logging.WARNING, logger=launch.__name__):
        make_accelerator(cfg)
        make_accelerator(cfg)  # bench builds one per run: still one line
    lines = [r.getMessage() for r in caplog.records if r.name == launch.__name__]
    assert len(lines) == 1 and "--multi_gpu --num_processes" in lines[0]
    launch._warn.cache_clear()


# ----------------------------------------------------------------------------- item 10: --no-progress


def test_no_progress_silences_transformers_and_hub_bars(tmp_path, hf_progress, capsys):
    missing = str(tmp_path / "missing.yaml")
    assert main(["run", missing]) == 1
    assert hf_progress() == (True, True)
    assert main(["run", missing, "--no-progress"]) == 1
    assert hf_progress() == (False, False)
    assert "missing.yaml" in capsys.readouterr().err
