"""skytune.launch: staging, rendering per flag, checks before provisioning, the Task handed to
SkyPilot, and the local runner. Only sky.launch / sky.jobs.launch (+ log streaming) and the
enabled-clouds query are replaced; everything else is real SkyPilot 0.14, offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from skytune import launch
from skytune.errors import SkytuneError, TrainingFailed
from skytune.launch import LaunchOptions

ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "jobs" / "sft.yaml"
CANARY = {"HF_TOKEN": "hf_CANARY_123", "AWS_ACCESS_KEY_ID": "AKIA_CANARY_456",
          "AWS_SECRET_ACCESS_KEY": "aws_CANARY_secret_789", "WANDB_API_KEY": "wandb_CANARY_0"}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A clean working dir and environment: no secrets, no ~/.aws, staging under tmp."""
    for k in (*launch.SECRET_NAMES, *launch.PASS_ENVS, "AWS_PROFILE", "SKYPILOT_TASK_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "qa.jsonl").write_text('{"question": "2+3?", "answer": "5"}\n')
    monkeypatch.chdir(work)
    return work


def write_recipe(work: Path, **over) -> Path:
    recipe = {"name": "demo", "model": "tiny:llama", "data": {"train": "data/qa.jsonl"},
              "output": {"store": "s3://bucket/skytune"}}
    for k, v in over.items():
        recipe[k] = v
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def secrets(monkeypatch):
    for k, v in CANARY.items():
        monkeypatch.setenv(k, v)
    return CANARY


@pytest.fixture
def fake_sky(monkeypatch):
    """Replace only the calls that would reach a cloud; record what they receive."""
    import sky

    calls: dict = {}

    def fake_launch(task, **kw):
        calls["launch"] = (task, kw)
        return "req-launch"

    def fake_jobs_launch(task, **kw):
        calls["jobs_launch"] = (task, kw)
        return "req-jobs"

    def fake_stream_and_get(request_id, **kw):
        calls.setdefault("streamed", []).append(request_id)
        return ([7], None) if request_id == "req-jobs" else (1, None)

    monkeypatch.setattr(sky, "launch", fake_launch)
    monkeypatch.setattr(sky.jobs, "launch", fake_jobs_launch)
    monkeypatch.setattr(sky, "stream_and_get", fake_stream_and_get)
    monkeypatch.setattr(sky, "tail_logs", lambda *a, **kw: calls.setdefault("exit", 0))
    monkeypatch.setattr(sky.jobs, "tail_logs", lambda **kw: calls.setdefault("exit", 0))
    monkeypatch.setattr(launch, "_enabled_clouds", lambda: ["aws", "gcp", "vast", "lambda"])
    return calls


def render(work: Path, opts: LaunchOptions, **recipe_over) -> dict:
    from skytune.recipe import load_recipe

    recipe = load_recipe(write_recipe(work, **recipe_over), opts.overrides)
    task = launch.load_task(launch.find_task(recipe, opts))
    return launch.render(recipe, opts, task, launch.stage(recipe), {"HF_TOKEN"})


def test_import_does_not_import_sky_or_torch():
    code = ("import sys, skytune.launch; "
            "assert 'sky' not in sys.modules and 'torch' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- render per flag


def test_defaults_keep_the_tasks_candidates_spot_first_with_on_demand(home):
    res = render(home, LaunchOptions())["resources"]
    file_res = yaml.safe_load(SFT.read_text())["resources"]
    assert res["any_of"] == file_res["any_of"]
    assert "job_recovery" not in res  # not managed: SkyPilot would warn and ignore it
    assert res["image_id"] == "docker:" + launch.default_image(None)


@pytest.mark.parametrize("opts,expect", [
    (LaunchOptions(gpu="A100-80GB:2"), {("A100-80GB:2", c, s) for c in
                                        ("vast", "runpod", "aws", "gcp") for s in (True, False)}
     | {("A100-80GB:2", "lambda", False)}),
    (LaunchOptions(cloud="lambda"), {("H100:1", "lambda", False),
                                     ("A100-80GB:1", "lambda", False)}),
    (LaunchOptions(cloud="aws", spot=True), {("H100:1", "aws", True),
                                             ("A100-80GB:1", "aws", True)}),
    (LaunchOptions(cloud="vast", spot=False, gpu="H100:1"), {("H100:1", "vast", False)}),
    (LaunchOptions(gpu="L4:1", cloud="gcp"), {("L4:1", "gcp", True), ("L4:1", "gcp", False)}),
])
def test_gpu_cloud_spot_flags(home, opts, expect):
    res = render(home, opts)["resources"]
    got = {(e["accelerators"], e["cloud"], e["use_spot"]) for e in res["any_of"]}
    assert got == expect


def test_spot_on_a_cloud_without_spot_is_an_error(home):
    with pytest.raises(SkytuneError, match="no spot instances on lambda"):
        render(home, LaunchOptions(cloud="lambda", spot=True))


def test_disk_image_and_managed_flags(home):
    config = render(home, LaunchOptions(disk=500, image="me/img:1", managed=True))
    res = config["resources"]
    assert res["disk_size"] == 500
    assert res["image_id"] == "docker:me/img:1"
    assert res["job_recovery"] == {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 3}


def test_recipe_launch_section_is_used_and_flags_win(home):
    launch_sec = {"gpus": ["H100:1", "H200:1"], "clouds": ["aws"], "spot": False,
                  "disk_gb": 300, "image": "docker:me/x:2"}
    res = render(home, LaunchOptions(), launch=launch_sec)["resources"]
    assert {(e["accelerators"], e["cloud"], e["use_spot"]) for e in res["any_of"]} == {
        ("H100:1", "aws", False), ("H200:1", "aws", False)}
    assert res["disk_size"] == 300 and res["image_id"] == "docker:me/x:2"
    res = render(home, LaunchOptions(gpu="A100:1", disk=100), launch=launch_sec)["resources"]
    assert {e["accelerators"] for e in res["any_of"]} == {"A100:1"}
    assert res["disk_size"] == 100


def test_disk_is_sized_from_the_model():
    assert launch.model_params_b("meta-llama/Llama-3.1-8B-Instruct") == 8
    assert launch.model_params_b("Qwen/Qwen2.5-0.5B-Instruct") == 0.5
    assert launch.model_params_b("mistralai/Mixtral-8x7B-v0.1") == 56
    assert launch.model_params_b("gpt2") is None
    from skytune.recipe import recipe_from_dict

    r = recipe_from_dict({"name": "x", "model": "meta-llama/Llama-3.1-70B",
                          "data": {"train": "a.jsonl"}})
    assert launch.disk_for(r) == 470  # 3 x 140 GB + 50


def test_vision_recipe_picks_vlm_task_and_keeps_its_disk_floor(home):
    (home / "data" / "qa.jsonl").write_text('{"image": "a.png", "question": "q", "answer": "a"}\n')
    config = render(home, LaunchOptions(), model="Qwen/Qwen2.5-VL-7B-Instruct",
                    data={"train": "data/qa.jsonl", "format": "vision"})
    assert config["resources"]["disk_size"] == 512  # vlm-sft.yaml's, above 3 x 14 GB + 50
    assert config["envs"]["RECIPE"] == "recipe.yaml"


def test_multinode_recipe_picks_multinode_task_without_vast_or_runpod(home):
    config = render(home, LaunchOptions(), launch={"num_nodes": 2})
    assert config["num_nodes"] == 2
    assert "torchrun" in config["run"]
    clouds = {e.get("cloud") for e in config["resources"]["any_of"]}
    assert clouds and not clouds & launch.NO_MULTINODE_CLOUDS
    with pytest.raises(SkytuneError, match="no multi-node"):
        render(home, LaunchOptions(cloud="vast"), launch={"num_nodes": 2})


def test_envs_secrets_and_mounts(home):
    config = render(home, LaunchOptions())
    assert config["envs"]["RECIPE"] == "recipe.yaml"
    assert not set(config["envs"]) & set(launch.SECRET_NAMES)
    assert config["secrets"]["HF_TOKEN"] is None  # sent: value supplied at launch
    assert config["secrets"]["WANDB_API_KEY"] == ""  # not set here: nothing sent
    staging = home / ".skytune" / "staging" / "demo"
    assert config["file_mounts"] == {"${SKYTUNE_JOB_DIR}": str(staging)}
    import sky

    task = sky.Task.from_yaml_config(config)
    assert task.file_mounts == {launch.JOB_DIR: str(staging)}


# ---------------------------------------------------------------------------- dryrun + secrets


def test_dryrun_prints_a_valid_task_and_no_secret_value(home, secrets, fake_sky):
    out = launch.launch(write_recipe(home), LaunchOptions(), dryrun=True)
    assert "HF_TOKEN" in out and "AWS_SECRET_ACCESS_KEY" in out
    for value in secrets.values():
        assert value not in out
    staging = home / ".skytune" / "staging" / "demo"
    for f in staging.rglob("*"):
        if f.is_file():
            text = f.read_text(errors="replace")
            assert not any(v in text for v in secrets.values()), f
    import sky

    task_text = out.split("\n\n")[0]
    sky.Task.from_yaml_config(yaml.safe_load(task_text))
    assert "launch" not in fake_sky and "jobs_launch" not in fake_sky


def test_secret_value_smuggled_into_rendered_text_is_refused(home, secrets):
    with pytest.raises(SkytuneError, match="secret value would appear"):
        launch.to_yaml({"envs": {"X": secrets["HF_TOKEN"]}}, SFT, Path("r.yaml"), secrets)


def test_aws_keys_are_not_sent_to_runs_without_s3(home, secrets):
    from skytune.recipe import load_recipe

    r = load_recipe(write_recipe(home, output={"store": "hf://me/runs"}))
    assert set(launch.local_secrets(r)) == {"HF_TOKEN", "WANDB_API_KEY"}


def test_aws_keys_come_from_the_credentials_file(home, monkeypatch, tmp_path):
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = AKIA_FILE\n"
                     "aws_secret_access_key = file_secret_1234\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    from skytune.recipe import load_recipe

    got = launch.local_secrets(load_recipe(write_recipe(home)))
    assert got == {"AWS_ACCESS_KEY_ID": "AKIA_FILE", "AWS_SECRET_ACCESS_KEY": "file_secret_1234"}


# ---------------------------------------------------------------------------- checks


def test_file_store_with_a_cloud_launch_is_an_error(home, secrets, fake_sky):
    path = write_recipe(home, output={"store": "file://runs"})
    for dryrun in (True, False):
        with pytest.raises(SkytuneError, match="output.store file://runs: the VM's disk"):
            launch.launch(path, LaunchOptions(), dryrun=dryrun)
    assert "launch" not in fake_sky


def test_gated_model_needs_hf_token(home, monkeypatch, fake_sky):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a" * 8)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b" * 8)
    path = write_recipe(home, model="meta-llama/Llama-3.1-8B-Instruct")
    with pytest.raises(SkytuneError, match="gated.*HF_TOKEN"):
        launch.launch(path, LaunchOptions(), dryrun=True)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert launch.launch(path, LaunchOptions(), dryrun=True)


def test_s3_store_needs_aws_keys(home, fake_sky):
    with pytest.raises(SkytuneError, match="s3:// but no AWS keys"):
        launch.launch(write_recipe(home), LaunchOptions(), dryrun=True)


def test_localhost_s3_endpoint_is_an_error(home, secrets, monkeypatch, fake_sky):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5555")
    with pytest.raises(SkytuneError, match="cannot reach"):
        launch.launch(write_recipe(home), LaunchOptions(), dryrun=True)


def test_no_enabled_cloud_says_run_sky_check(home, secrets, fake_sky, monkeypatch):
    monkeypatch.setattr(launch, "_enabled_clouds", list)
    with pytest.raises(SkytuneError, match="sky check"):
        launch.launch(write_recipe(home), LaunchOptions(), dryrun=False)
    monkeypatch.setattr(launch, "_enabled_clouds", lambda: ["gcp"])
    with pytest.raises(SkytuneError, match="--cloud aws is not enabled"):
        launch.launch(write_recipe(home), LaunchOptions(cloud="aws"), dryrun=False)
    assert "launch" not in fake_sky


# ---------------------------------------------------------------------------- the Task SkyPilot gets


def test_launch_hands_sky_launch_the_rendered_task(home, secrets, fake_sky, monkeypatch):
    monkeypatch.setattr(launch, "_enabled_clouds", lambda: ["aws", "vast"])
    out = launch.launch(write_recipe(home), LaunchOptions(gpu="H100:1"), dryrun=False)
    task, kw = fake_sky["launch"]
    assert kw["cluster_name"] == "skytune-demo" and kw["down"] is True
    assert kw["idle_minutes_to_autostop"] == 5
    assert {(r.cloud.canonical_name(), r.use_spot) for r in task.resources} == {
        ("aws", True), ("aws", False), ("vast", True), ("vast", False)}  # lambda etc. not enabled
    assert {r.job_recovery for r in task.resources} == {None}
    assert {k: v.get_secret_value() for k, v in task.secrets.items()} == secrets
    assert not set(task.envs) & set(launch.SECRET_NAMES)
    staging = home / ".skytune" / "staging" / "demo"
    assert task.file_mounts == {launch.JOB_DIR: str(staging)}
    assert task.envs["RECIPE"] == "recipe.yaml" and (staging / "recipe.yaml").is_file()
    for value in secrets.values():  # SkyPilot ships this YAML copy; it must hold no value
        assert value not in task.to_yaml_config().get("_user_specified_yaml", "")
        assert value not in out
    assert "job 1 on skytune-demo finished" in out


def test_managed_flag_uses_sky_jobs_launch_with_recovery(home, secrets, fake_sky):
    launch.launch(write_recipe(home), LaunchOptions(managed=True, cloud="aws"), dryrun=False)
    assert "launch" not in fake_sky
    task, kw = fake_sky["jobs_launch"]
    assert kw["name"] == "skytune-demo"
    assert {r.job_recovery["strategy"] for r in task.resources} == {"EAGER_NEXT_REGION"}
    assert task.secrets["HF_TOKEN"].get_secret_value() == secrets["HF_TOKEN"]


def test_a_failed_job_raises_training_failed(home, secrets, fake_sky):
    fake_sky["exit"] = 100
    with pytest.raises(TrainingFailed, match="exited with code 100; see `sky logs"):
        launch.launch(write_recipe(home), LaunchOptions(), dryrun=False)


# ---------------------------------------------------------------------------- staging


def test_staging_copies_local_data_vision_images_and_reward_modules(home):
    from skytune.recipe import load_recipe

    img_dir = home / "data" / "img"
    img_dir.mkdir()
    (img_dir / "1.png").write_bytes(b"png")
    (home / "data" / "vis.jsonl").write_text('{"image": "img/1.png", "question": "q", '
                                             '"answer": "a"}\n')
    (home / "my_rewards.py").write_text("def r(completions, **kw):\n    return [0.0]\n")
    path = write_recipe(home, data={"train": "data/vis.jsonl", "eval": "hf://datasets/o/n"},
                        output={"store": "file://runs"}, rewards=["my_rewards:r"])
    out = launch.stage(load_recipe(path))
    staged = yaml.safe_load((out / "recipe.yaml").read_text())
    assert staged["data"]["train"] == "data/vis.jsonl"
    assert staged["data"]["eval"] == "hf://datasets/o/n"
    assert staged["output"]["store"] == f"file://{home / 'runs'}"
    assert (out / "data" / "img" / "1.png").read_bytes() == b"png"
    assert (out / "my_rewards.py").is_file()
    assert staged["model"] == "tiny:llama"


def test_staging_keeps_the_local_run_id(home, tmp_path):
    from skytune.recipe import load_recipe

    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "qa.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    r = load_recipe(write_recipe(home, data={"train": str(other / "qa.jsonl")}))
    staged = yaml.safe_load((launch.stage(r, pin_run_id=True) / "recipe.yaml").read_text())
    assert staged["output"]["run_id"] == f"demo-{r.config_hash()}"  # paths changed the hash
    r = load_recipe(write_recipe(home))
    staged = yaml.safe_load((launch.stage(r, pin_run_id=True) / "recipe.yaml").read_text())
    assert staged["output"]["run_id"] is None  # same hash: nothing to pin


def test_missing_data_file_is_named(home):
    from skytune.recipe import load_recipe

    with pytest.raises(SkytuneError, match="data: data/nope.jsonl: no such file"):
        launch.stage(load_recipe(write_recipe(home, data={"train": "data/nope.jsonl"})))


# ---------------------------------------------------------------------------- local runner


def local_task(home: Path, run: str, setup: str = "echo setting up") -> Path:
    task = yaml.safe_load(SFT.read_text())
    task["setup"], task["run"] = setup, run
    path = home / "task.yaml"
    path.write_text(yaml.safe_dump(task))
    return path


def test_run_local_shows_skypilot_variables_and_the_staged_recipe(home, capfd, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_CANARY_123")
    run = ('echo "rank=$SKYPILOT_NODE_RANK ips=$SKYPILOT_NODE_IPS nodes=$SKYPILOT_NUM_NODES '
           'gpus=$SKYPILOT_NUM_GPUS_PER_NODE task=${SKYPILOT_TASK_ID:-unset}"\n'
           'cd "$SKYTUNE_JOB_DIR" && test -f "$RECIPE" && echo "recipe=$PWD/$RECIPE"\n'
           'echo "skytune=$(command -v skytune)" "token=${#HF_TOKEN}"\n')
    path = write_recipe(home, output={"store": "file://runs"})
    code = launch.run_local(path, LaunchOptions(task=local_task(home, run)))
    out = capfd.readouterr().out
    assert code == 0, out
    assert "setting up" in out
    assert "rank=0 ips=127.0.0.1 nodes=1 gpus=0 task=unset" in out
    staging = (home / ".skytune" / "staging" / "demo").resolve()
    assert f"recipe={staging}/recipe.yaml" in out
    assert f"skytune={Path(sys.executable).parent}/skytune" in out
    assert f"token={len('hf_CANARY_123')}" in out  # the secret reaches the run, unprinted


def test_run_local_returns_the_run_exit_code_and_stops_on_setup_failure(home):
    path = write_recipe(home, output={"store": "file://runs"})
    assert launch.run_local(path, LaunchOptions(task=local_task(home, "exit 3"))) == 3
    with pytest.raises(SkytuneError, match="setup section exited with code 4"):
        launch.run_local(path, LaunchOptions(task=local_task(home, "echo no", "exit 4")))
