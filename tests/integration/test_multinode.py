"""jobs/multinode.yaml's run section on two local "nodes": two bash processes, each with the
SKYPILOT_* variables SkyPilot gives one node, each starting torchrun with one CPU process
(gloo), doing data-parallel SFT of a tiny model. Checks the script itself (rendezvous on
the first IP of SKYPILOT_NODE_IPS, node ranks, `python -m skytune.cli train`), and that
the two ranks together write one run to the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from skytune import launch
from skytune.recipe import load_recipe
from skytune.stores.local_s3 import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "jobs" / "recipes" / "data" / "demo_qa.jsonl"



def node_env(rank: int, staging: Path, work: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPILOT_", "CUDA_"))}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "RECIPE": launch.STAGED_RECIPE,
        "SKYTUNE_JOB_DIR": str(staging),
        "MASTER_PORT": str(port),
        "SKYPILOT_NODE_RANK": str(rank),
        "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1",  # one line per node, head first
        "SKYPILOT_NUM_NODES": "2",
        "SKYPILOT_NUM_GPUS_PER_NODE": "1",  # one process per "node" (CPU here)
        "SKYPILOT_TASK_ID": "sky-2025-01-01-00-00-00-000000_skytune-mn_1",
        "SKYTUNE_WORK_DIR": str(work / f"node{rank}"),  # separate machines: separate disks
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    })
    return env


@pytest.mark.timeout(900)
def test_two_nodes_train_one_run(tmp_path):
    assert DATA.is_file(), "jobs/recipes/data/demo_qa.jsonl is missing"
    recipe_path = tmp_path / "mn.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "name": "mn", "model": "tiny:llama", "preset": "fast_test",
        "data": {"train": str(DATA), "format": "qa"},
        "train": {"max_steps": 4, "save_every": 2, "micro_batch": 2},
        "output": {"store": f"file://{tmp_path / 'store'}"},
        "launch": {"num_nodes": 2},
    }))
    recipe = load_recipe(recipe_path)
    staging = launch.stage(recipe, root=tmp_path / "staging")
    task = launch.load_task(launch.find_task(recipe, launch.LaunchOptions()))
    assert task["num_nodes"] == 2
    port = free_port()
    procs = [subprocess.Popen(["bash", "-c", task["run"]], cwd=tmp_path,
                              env=node_env(rank, staging, tmp_path, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=840)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for rank, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"node {rank} exited {p.returncode}:\n{out[-4000:]}"
    runs = [d for d in (tmp_path / "store").iterdir() if d.is_dir()]
    assert len(runs) == 1, runs  # both ranks, one run id (from SKYPILOT_TASK_ID)
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["step"] == 4
    # Data parallel for real: 4 steps over 2 ranks consume twice the rows one process would.
    rows = sum(1 for line in DATA.read_text().splitlines() if line.strip())
    metrics = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    epoch = max(float(m["epoch"]) for m in metrics if "epoch" in m)
    assert epoch > 1.5 * (4 * 2 / rows), (epoch, rows)
