"""tools/throughput.py: runs in-process on the synthetic MST config and tabulates every stage against the plain step."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO, TEST_CONFIGS
from crossmodal_kd.config import ConfigError
from crossmodal_kd.data import build_dataset


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput", REPO / "tools" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_steps_on_the_synthetic_mst_config(throughput, capsys):
    argv = [str(TEST_CONFIGS / "synthetic_mst.yaml"), "--device", "cpu", "--steps", "2", "--warmup", "1"]
    assert throughput.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| stage | method | ms/step | samples/s |")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("plain", "supervised"), ("collab", "collaborative"),
        ("mask_mm_1 (live teachers)", "mask"), ("mask_mm_1 (target store)", "mask"),  # its frozen student's targets
        ("routed (live teachers)", "mst_distill"), ("routed (target store)", "mst_distill"),
    ]
    for r in rows:
        assert float(r[2]) > 0 and float(r[3]) > 0
        assert (r[7] != "") == r[0].endswith("(target store)")  # the store's build time, on its rows only
    assert rows[0][5] == "1.00"  # the plain step is the reference


def test_rows_and_errors(throughput):
    rows = throughput.run([str(TEST_CONFIGS / "synthetic_mst.yaml"), "--device", "cpu", "--steps", "1", "--warmup", "0",
                           "--stages", "routed", "--batch-size", "8", "--mixed-precision", "bf16"])
    assert [r["stage"] for r in rows] == ["plain", "routed (live teachers)", "routed (target store)"]
    assert rows[1]["live_teacher_passes"] > 0 and rows[2]["live_teacher_passes"] == 0  # served: no teacher forward
    assert rows[1]["info"]["mixed_precision"] == "bf16" and rows[1]["info"]["batch_size"] == 8
    both = throughput.run([str(TEST_CONFIGS / "synthetic_mst.yaml"), "--device", "cpu", "--steps", "1", "--warmup", "0",
                           "--stages", "routed", "--batch-size", "8", "--mixed-precision", "bf16", "--targets", "store", "--layouts", "both"])
    assert [r["stage"] for r in both] == ["plain [NCHW]", "routed (target store) [NCHW]", "plain [NHWC]", "routed (target store) [NHWC]"]
    assert both[0]["time_ratio"] == 1.0 and all(r["ms_per_step"] > 0 for r in both)
    with pytest.raises(ConfigError, match="no stage named 'nope'"):
        throughput.run([str(TEST_CONFIGS / "synthetic_mst.yaml"), "--device", "cpu", "--stages", "nope"])
    with pytest.raises(ConfigError, match="--shapes"):
        throughput.run([str(TEST_CONFIGS / "synthetic_mst.yaml"), "--device", "cpu", "--shapes", "image=1xa"])


def test_avdigits_shapes_are_known_without_the_data(tmp_path):
    """Matches the built dataset's arrays (image 1x28x28, log-mel 1x40x51 at 8 kHz, hop 160; 10 digits)."""
    family = build_dataset("avdigits", str(tmp_path))
    assert family.input_spec() == ({"image": (1, 28, 28), "audio": (1, 40, 51)}, 10)
    assert not any(tmp_path.iterdir())  # nothing was built
