"""Data-parallel supervised training through accelerate: two CPU processes, one checkpoint.

The tiny recipe runs unchanged under ``accelerate launch`` and ``torchrun`` with two processes
(gloo on CPU). Each micro-batch is split by index across the processes, so the result is close to
the one-process run on the same global batch but not bit-equal (each process averages its own
tokens' loss), and only the main process writes the checkpoint.

``accelerate launch --cpu --num_processes 2`` starts one process in accelerate 1.x (CPU processes
come from mpirun with ``--mpirun_hostfile``); on a machine without a GPU, ``--multi_gpu`` starts
the processes through torch.distributed.run and the trainer's ``Accelerator(cpu=True)`` makes them
a gloo CPU group.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from examples.tiny.make_data import make_dataset  # noqa: E402
from train.checkpoint import read_meta  # noqa: E402
from train.recipe import load_recipe  # noqa: E402
from train.sft import shard, train_stage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = {
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    + ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m"],
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "-m"],
}


def test_shard_splits_a_micro_batch_by_index() -> None:
    assert shard([5, 1, 4, 2, 0], 0, 2) == [5, 4, 0]
    assert shard([5, 1, 4, 2, 0], 1, 2) == [1, 2]
    assert shard([7], 1, 2) == [7]  # fewer examples than processes: repeated, none idle
    assert shard([3, 9], 0, 1) == [3, 9]


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    """The tiny example recipe, unchanged but for its data path and a 2-step stage 1."""
    folder = tmp_path_factory.mktemp("tiny")
    records = make_dataset(folder, per_kind=1)
    text = (REPO / "examples" / "tiny" / "recipe.toml").read_text()
    text = text.replace('path = "data/records.jsonl"', f'path = "{records}"')
    text = text.replace("max_steps = 36", "max_steps = 2")
    recipe = folder / "recipe.toml"
    recipe.write_text(text)
    assert tomllib.loads(text)["training"]["detect"]["max_steps"] == 2
    return recipe


@pytest.fixture(scope="module")
def single(recipe_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "detect"
    train_stage(load_recipe(recipe_file), "detect", out, progress=False)
    return out


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_cpu_processes_train_and_write_one_checkpoint(
    launcher, recipe_file, single, tmp_path
) -> None:
    out = tmp_path / "runs" / "detect"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, *LAUNCHERS[launcher], "train.cli", "--stage", "detect"]
    command += ["--recipe", str(recipe_file), "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    meta = read_meta(out)
    assert (meta["step"], meta["done"], len(meta["history"])) == (2, True, 2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["detect"]  # no temporary leftovers
    two, one = load_file(out / "inspector.safetensors"), load_file(single / "inspector.safetensors")
    assert two.keys() == one.keys()
    diffs = [float((two[k] - one[k]).abs().max()) for k in two]
    # The same global batch split over two processes: the same steps, not bit-equal ones.
    assert 0.0 < max(diffs) < 0.02, diffs
    losses = [loss for _, loss in meta["history"]]
    single_losses = [loss for _, loss in read_meta(single)["history"]]
    assert losses == pytest.approx(single_losses, rel=1e-2) and losses != single_losses
