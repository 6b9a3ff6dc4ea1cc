"""jobs/*.yaml and infra/: valid for SkyPilot 0.14's own schemas, runnable headers, no secrets
in envs, one image tag (the one skytune.images / launch.default_image gives)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from skytune import launch

ROOT = Path(__file__).resolve().parents[2]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
EXPECTED = {"sft", "dpo", "grpo", "vlm-sft", "merge", "multinode"}


def test_every_task_is_there():
    assert {p.stem for p in JOBS} >= EXPECTED


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_task_validates_with_skypilot(path):
    import sky

    config = yaml.safe_load(path.read_text())
    task = sky.Task.from_yaml_config(config)
    assert task.run and task.resources


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_task_opens_with_the_command_that_runs_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith(("# skytune launch ", "# sky launch ")), first
    assert "sky launch jobs/" + path.name in path.read_text()


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_secrets_are_secrets_not_envs(path):
    config = yaml.safe_load(path.read_text())
    envs = config.get("envs") or {}
    assert not set(envs) & set(launch.SECRET_NAMES)
    for value in (config.get("secrets") or {}).values():
        assert value in ("", None)  # a value in a task file would be committed


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_image_is_the_one_skytune_defines(path):
    config = yaml.safe_load(path.read_text())
    assert config["resources"]["image_id"] == "docker:" + launch.default_image(None)


@pytest.mark.parametrize("name", ["sft", "dpo", "grpo", "vlm-sft", "multinode"])
def test_training_tasks_mount_the_job_dir_and_resume(name):
    config = yaml.safe_load((ROOT / "jobs" / f"{name}.yaml").read_text())
    assert "${SKYTUNE_JOB_DIR}" in config["file_mounts"]
    assert config["envs"]["SKYTUNE_JOB_DIR"] == launch.JOB_DIR
    assert "--resume auto" in config["run"]
    res = config["resources"]
    assert res["job_recovery"]["strategy"] == "EAGER_NEXT_REGION"
    for entry in res["any_of"]:  # spot only where the cloud has it
        if entry["use_spot"]:
            assert entry["cloud"] not in launch.NO_SPOT_CLOUDS
        if config.get("num_nodes", 1) > 1:
            assert entry["cloud"] not in launch.NO_MULTINODE_CLOUDS


def test_spot_entries_have_an_on_demand_fallback():
    res = yaml.safe_load((ROOT / "jobs/sft.yaml").read_text())["resources"]
    spot = {(e["accelerators"], e["cloud"]) for e in res["any_of"] if e["use_spot"]}
    ondemand = {(e["accelerators"], e["cloud"]) for e in res["any_of"] if not e["use_spot"]}
    assert spot and spot <= ondemand


def test_multinode_runs_torchrun_on_skypilot_variables():
    config = yaml.safe_load((ROOT / "jobs/multinode.yaml").read_text())
    assert config["num_nodes"] == 2
    run = config["run"]
    for var in ("SKYPILOT_NUM_NODES", "SKYPILOT_NUM_GPUS_PER_NODE", "SKYPILOT_NODE_RANK",
                "SKYPILOT_NODE_IPS"):
        assert var in run
    assert "-m skytune.cli train" in run


def test_python_dash_m_skytune_cli_runs():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "skytune.cli", "--help"], capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0 and "train" in out.stdout


def test_sky_config_template_validates():
    from sky.utils import common_utils, schemas

    config = yaml.safe_load((ROOT / "infra/sky-config.yaml").read_text())
    common_utils.validate_schema(config, schemas.get_config_schema(), "infra/sky-config.yaml: ")


def test_s3_policy_and_lifecycle_are_json_of_the_right_shape():
    policy = json.loads((ROOT / "infra/s3-bucket-policy.json").read_text())
    assert policy["Version"] == "2012-10-17" and policy["Statement"]
    rules = json.loads((ROOT / "infra/s3-lifecycle.json").read_text())["Rules"]
    assert any("AbortIncompleteMultipartUpload" in r for r in rules)
    assert all(r["Status"] in ("Enabled", "Disabled") for r in rules)
