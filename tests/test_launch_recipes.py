"""The Accelerate launch recipes in configs/accelerate/: valid config files that resolve as documented;
the 2-process CPU one really trains."""

from __future__ import annotations

import pytest

from conftest import REPO, TEST_CONFIGS, accelerate_launch, read_json

RECIPES = REPO / "configs" / "accelerate"
# recipe -> (distributed over several processes, processes in all, machines, on CPU)
EXPECTED = {
    "cpu_2proc.yaml": (True, 2, 1, True),
    "single_gpu.yaml": (False, 1, 1, False),
    "multi_gpu_ddp.yaml": (True, 8, 1, False),
    "multi_node.yaml": (True, 16, 2, False),
}


def test_every_recipe_is_tested():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_loads_and_resolves_like_accelerate_launch(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = RECIPES / name
    assert isinstance(load_config_from_file(str(path)), ClusterConfig)
    args = launch_command_parser().parse_args(["--config_file", str(path), "tools/train.py", "config.yaml"])
    _validate_launch_command(args)  # what `accelerate launch --config_file` does before starting anything
    multi, processes, machines, cpu = EXPECTED[name]
    assert (bool(args.multi_gpu), args.num_processes, args.num_machines, bool(args.use_cpu)) == (multi, processes, machines, cpu)
    assert args.mixed_precision == "no"  # precision is the run config's accelerator.mixed_precision
    if machines > 1:
        assert args.main_process_ip and args.main_process_port and args.machine_rank == 0


@pytest.mark.slow
def test_cpu_2proc_recipe_runs_two_processes(tmp_path):
    """As the README shows it: ``ACCELERATE_USE_CPU=1 accelerate launch --config_file .../cpu_2proc.yaml``."""
    out = tmp_path / "run"
    accelerate_launch(["--config_file", str(RECIPES / "cpu_2proc.yaml")],
                      ["tools/train.py", str(TEST_CONFIGS / "synthetic_kd.yaml"), "--fast-dev-run", "--no-progress", "--output-dir", str(out)])
    assert read_json(out / "environment.json")["world_size"] == 2
    assert list(read_json(out / "metrics.json")["stages"]) == ["teacher_mm", "student_only", "kd_mm"]
