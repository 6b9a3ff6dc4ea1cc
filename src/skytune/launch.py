"""From a recipe to a SkyPilot task: stage, render, check, launch (or run it here).

    from skytune.launch import LaunchOptions, launch, run_local
    opts = LaunchOptions(gpu="H100:1", cloud="vast")
    print(launch(Path("jobs/recipes/demo.yaml"), opts, dryrun=True))  # task YAML + plan
    launch(Path("jobs/recipes/demo.yaml"), opts, dryrun=False)        # sky.launch, stream logs
    run_local(Path("jobs/recipes/demo.yaml"), LaunchOptions())         # same task, this machine

The steps, each a function of its own:
  stage()   copies the resolved recipe and its local data (and reward modules) into
            .skytune/staging/<name>/, the one directory the task mounts at /skytune/job;
  render()  reads jobs/<method>.yaml and fills in resources (recipe `launch:` + flags),
            envs, file_mounts and the *names* of the secrets: a plain dict, no SkyPilot;
  check()   refuses, before anything is rented, what would fail on the VM (a file:// store,
            a gated model without HF_TOKEN, s3 without AWS keys, no cloud enabled);
  launch()  validates with SkyPilot's own schema, then sky.launch / sky.jobs.launch.

This is the only module that imports `sky`, and only inside functions (STYLE rule 5):
`import sky` costs over a second and `skytune --help` must stay instant. Secret values
travel only in Task.update_secrets(); they are never rendered, written or put in an error.
"""

from __future__ import annotations

import configparser
import copy
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from skytune.errors import SkytuneError, TrainingFailed

if TYPE_CHECKING:
    import sky

    from skytune.recipe import Recipe

# Sent to the VM as SkyPilot secrets (redacted in its logs), never as envs.
SECRET_NAMES = ("HF_TOKEN", "WANDB_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN")
AWS_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# A private image registry's login; SkyPilot wants all three together, in secrets.
DOCKER_SECRETS = ("SKYPILOT_DOCKER_USERNAME", "SKYPILOT_DOCKER_PASSWORD",
                  "SKYPILOT_DOCKER_SERVER")
# Not secret, but the VM needs them to reach the same bucket / W&B project as you.
PASS_ENVS = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "WANDB_PROJECT",
             "WANDB_ENTITY")

JOB_DIR = "/skytune/job"          # where the task mounts the staged recipe on the VM
STAGED_RECIPE = "recipe.yaml"
STAGING_ROOT = Path(".skytune/staging")

# From SkyPilot 0.14's clouds/*.py _CLOUD_UNSUPPORTED_FEATURES (SPOT_INSTANCE, MULTI_NODE).
# Kept as data so rendering needs no `import sky`; a `use_spot: true` entry on these
# clouds passes the schema and only fails in the optimizer, after minutes of waiting.
NO_SPOT_CLOUDS = frozenset({"lambda", "fluidstack", "cudo", "do", "paperspace", "hyperbolic",
                            "scp", "seeweb", "shadeform", "kubernetes", "slurm", "vsphere",
                            "yotta"})
NO_MULTINODE_CLOUDS = frozenset({"vast", "runpod"})

# Hub repos that refuse downloads without an accepted licence and a token. A short list on
# purpose: the common ones; anything else that is gated fails in `skytune doctor` (setup).
GATED_MODEL_PREFIXES = ("meta-llama/", "google/gemma", "google/paligemma", "google/medgemma",
                        "mistralai/", "CohereForAI/", "CohereLabs/")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")


@dataclass
class LaunchOptions:
    """What `skytune launch` was asked for; None means "from the recipe, then the task"."""

    task: Path | None = None
    gpu: str | None = None
    cloud: str | None = None
    spot: bool | None = None
    managed: bool = False
    disk: int | None = None
    image: str | None = None
    overrides: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- entry points


def launch(recipe_path: Path, opts: LaunchOptions, dryrun: bool = False) -> str | None:
    """Render the recipe's task and launch it; with dryrun, return the task and plan instead.

    Raises SkytuneError for anything that would fail on the VM, before provisioning;
    TrainingFailed when the job ran and exited non-zero.
    """
    from skytune.recipe import load_recipe

    recipe = load_recipe(recipe_path, opts.overrides)
    secrets = local_secrets(recipe)
    check(recipe, secrets)
    task_path = find_task(recipe, opts)
    staging = stage(recipe)
    config = render(recipe, opts, load_task(task_path), staging, set(secrets))
    if not dryrun:
        config = _keep_enabled_clouds(config, _enabled_clouds(), opts)
    validate(config)
    out = staging / "task.yaml"  # inside the mounted dir: harmless, and where you look
    text = to_yaml(config, task_path, recipe_path, secrets, out)
    out.write_text(text, encoding="utf-8")
    if dryrun:
        gpus = _unique([e.get("accelerators") for e in config["resources"].get("any_of", [])])
        return text + "\n" + _plan_text(recipe, gpus)
    managed = opts.managed or recipe.launch.managed
    return _sky_launch(config, secrets, recipe, managed)


def run_local(recipe_path: Path, opts: LaunchOptions) -> int:
    """Run the task's setup and run sections here, as one SkyPilot node would see them.

    Returns the run section's exit code; raises SkytuneError if setup fails.
    """
    from skytune.recipe import load_recipe

    recipe = load_recipe(recipe_path, opts.overrides)
    task_path = find_task(recipe, opts)
    config = load_task(task_path)
    staging = stage(recipe, pin_run_id=True)
    env = local_env(config, staging)
    for section in ("setup", "run"):
        script = config.get(section)
        if not script:
            continue
        # Inherits stdout/stderr, so output streams as it comes; bash without -e like the VM.
        code = subprocess.run(["bash", "-c", script], env=env, cwd=staging, check=False).returncode
        if section == "setup" and code:
            raise SkytuneError(f"{task_path}: the setup section exited with code {code} (its "
                               "output is above); fix that, the run section did not start")
        if section == "run":
            return code
    return 0


# ---------------------------------------------------------------------------- staging


def stage(recipe: Recipe, root: Path | None = None, pin_run_id: bool = False) -> Path:
    """Copy the resolved recipe, its local data and reward modules into one directory.

    Local data becomes data/<basename> (hard-linked when possible: no second copy on disk);
    vision rows' images follow at the same path relative to the data file. Remote data
    (s3://, hf://) is left alone. pin_run_id keeps the run id that `skytune train` on the
    original file would use even though staging rewrote paths (local runs only: a cloud
    run id comes from SKYPILOT_TASK_ID, stable across recoveries).
    """
    from skytune.recipe import recipe_from_dict

    out = (root or STAGING_ROOT).resolve() / recipe.name
    if out.exists():
        shutil.rmtree(out)  # a previous launch's copy; links only, sources stay
    (out / "data").mkdir(parents=True)
    d = recipe.to_dict()
    d["output"]["store"] = recipe.store_url()
    stager = _Stager(recipe, out)
    stager.section(d)
    for st in d.get("stages") or []:
        stager.section(st)
    if pin_run_id and not d.get("stages") and not d["output"].get("run_id"):
        staged = recipe_from_dict(copy.deepcopy(d), base_dir=out)
        if staged.config_hash() != recipe.config_hash():
            d["output"]["run_id"] = f"{recipe.name}-{recipe.config_hash()}"
    header = f"# Staged by `skytune launch` from {recipe.base_dir}; local data is in data/.\n"
    (out / STAGED_RECIPE).write_text(header + yaml.safe_dump(d, sort_keys=False), "utf-8")
    return out


class _Stager:
    """Rewrites one recipe (or stage) dict's local paths into the staging directory."""

    def __init__(self, recipe: Recipe, out: Path):
        self.recipe, self.out = recipe, out
        self.placed: dict[Path, str] = {}  # source -> path relative to out

    def section(self, d: dict[str, Any]) -> None:
        data = d.get("data") or {}
        for key in ("train", "eval"):
            if data.get(key) and _is_local(data[key]):
                data[key] = self.data(data[key], data.get("format", "auto"),
                                      data.get("fields") or {})
        for key in ("model", "init_from"):  # a local model or previous run: absolute path
            local = _existing_path(self.recipe, d.get(key))
            if local:
                d[key] = local
        for reward in d.get("rewards") or []:
            self.reward_module(reward)

    def data(self, p: str, fmt: str, fields: dict[str, str]) -> str:
        src = Path(self.recipe.path(p.removeprefix("file://")))
        if not src.exists():
            raise SkytuneError(f"data: {p}: no such file or directory (looked in {src}); "
                               "fix data.train / data.eval")
        if src in self.placed:
            return self.placed[src]
        rel = f"data/{src.name}"
        n = 2
        while (self.out / rel).exists():  # two files of one name from different dirs
            rel, n = f"data/{n}/{src.name}", n + 1
        _link_or_copy(src, self.out / rel)
        if src.is_file() and fmt in ("auto", "vision"):
            for img in _image_paths(src, fields):
                self.image(src, img, (self.out / rel).parent)
        self.placed[src] = rel
        return rel

    def image(self, data_file: Path, img: str, dest_dir: Path) -> None:
        if "://" in img:
            return
        src = (data_file.parent / img).resolve()
        try:
            rel = src.relative_to(data_file.parent.resolve())
        except ValueError:
            raise SkytuneError(f"{data_file}: image '{img}' is outside the data file's "
                               "directory; move it under that directory so it can be "
                               "shipped with the data") from None
        if src.is_file() and not (dest_dir / rel).exists():
            _link_or_copy(src, dest_dir / rel)

    def reward_module(self, reward: str) -> None:
        if ":" not in reward:
            return  # a built-in reward
        module = reward.split(":", 1)[0].split(".")[0]
        for cand in (self.recipe.base_dir / f"{module}.py", self.recipe.base_dir / module):
            if cand.exists() and not (self.out / cand.name).exists():
                _link_or_copy(cand, self.out / cand.name)


def _is_local(p: str) -> bool:
    return p.startswith("file://") or ("://" not in p and not p.startswith(("tiny:", "random:")))


def _existing_path(recipe: Recipe, p: str | None) -> str | None:
    """A model / init_from that is a path on this machine, made absolute; None for hub ids
    and URLs (org/name is both a hub id and a relative path: it is a path if it exists)."""
    if not p or not _is_local(p):
        return None
    path = recipe.path(p.removeprefix("file://"))
    return path if Path(path).exists() else None


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy_file)
    else:
        _link_or_copy_file(src, dst)


def _link_or_copy_file(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: a real copy
        shutil.copy2(src, dst)


def _image_paths(data_file: Path, fields: dict[str, str]) -> list[str]:
    """Relative image paths named by a vision data file's rows (none for other formats)."""
    keys = {fields.get("image", "image"), fields.get("images", "images")}
    if data_file.suffix == ".jsonl":  # peek first: most data is not vision, skip the read
        with data_file.open(encoding="utf-8", errors="replace") as f:
            first = f.readline()
        if not any(f'"{k}"' in first for k in keys):
            return []
    elif data_file.stat().st_size > 200 << 20:
        return []  # a big non-jsonl table: not worth parsing here; data.py checks images
    from skytune.data import load_rows

    out: list[str] = []
    for row in load_rows(str(data_file)):
        for k in keys:
            v = row.get(k) if isinstance(row, dict) else None
            out += [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, str)]
    return out


# ---------------------------------------------------------------------------- render


def find_task(recipe: Recipe, opts: LaunchOptions) -> Path:
    """--task, else jobs/multinode.yaml (num_nodes > 1), vlm-sft.yaml (vision) or <method>."""
    if opts.task:
        if not opts.task.is_file():
            raise SkytuneError(f"--task {opts.task}: no such file")
        return opts.task
    name = recipe.method
    if recipe.launch.num_nodes > 1:
        name = "multinode"
    elif recipe.method == "sft" and recipe.data.format == "vision":
        name = "vlm-sft"
    # ./jobs first (your own edited copy), then the checkout skytune runs from.
    for jobs in (Path.cwd() / "jobs", Path(__file__).resolve().parents[2] / "jobs"):
        if (jobs / f"{name}.yaml").is_file():
            return jobs / f"{name}.yaml"
    raise SkytuneError(f"no jobs/{name}.yaml here or in skytune's checkout; "
                       "pass --task path/to/task.yaml")


def load_task(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SkytuneError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise SkytuneError(f"{path}: a SkyPilot task is a YAML mapping (resources:, run:, ...)")
    return config


def render(recipe: Recipe, opts: LaunchOptions, task: dict[str, Any], staging: Path,
           secrets_set: set[str]) -> dict[str, Any]:
    """The task config for this recipe: plain data, secret *names* only (None = sent)."""
    config = copy.deepcopy(task)
    config["name"] = f"skytune-{_slug(recipe.name)}"
    managed = opts.managed or recipe.launch.managed
    config["resources"] = render_resources(config.get("resources") or {}, recipe, opts,
                                           managed)
    if recipe.launch.num_nodes > 1:
        config["num_nodes"] = recipe.launch.num_nodes
    envs = {str(k): str(v) for k, v in (config.get("envs") or {}).items()}
    envs.update(RECIPE=STAGED_RECIPE, SKYTUNE_JOB_DIR=envs.get("SKYTUNE_JOB_DIR", JOB_DIR))
    envs.update({k: os.environ[k] for k in PASS_ENVS if os.environ.get(k)})
    config["envs"] = envs
    names = list(dict.fromkeys([*(config.get("secrets") or {}), *secrets_set]))
    # null = "value supplied at launch" (SkyPilot's form; `sky launch --secret NAME`);
    # "" = not used by this run, so nothing is sent.
    config["secrets"] = {k: (None if k in secrets_set else "") for k in names}
    mounts = dict(config.get("file_mounts") or {})
    key = next((k for k in mounts if "SKYTUNE_JOB_DIR" in k or k == envs["SKYTUNE_JOB_DIR"]),
               "${SKYTUNE_JOB_DIR}")
    mounts[key] = str(staging)
    config["file_mounts"] = mounts
    return config


def render_resources(res: dict[str, Any], recipe: Recipe, opts: LaunchOptions,
                     managed: bool) -> dict[str, Any]:
    """Candidates = GPUs x clouds x (spot, on-demand): flags > recipe `launch:` > the task."""
    res = copy.deepcopy(res)
    entries = res.pop("any_of", None) or res.pop("ordered", None) or []
    gpus = [opts.gpu] if opts.gpu else _as_list(recipe.launch.gpus)
    clouds: list[str | None] = [opts.cloud] if opts.cloud else list(recipe.launch.clouds or [])
    if entries or gpus or clouds or opts.spot is not None:
        gpus = gpus or _unique([e.get("accelerators") for e in entries]) \
            or [res.pop("accelerators", None)]
        clouds = clouds or _unique([_cloud_of(e) for e in entries]) or [None]
        res.pop("accelerators", None)
        res.pop("use_spot", None)
        spot = _spot_mode(opts.spot, recipe.launch.spot)
        res["any_of"] = _candidates(gpus, clouds, spot, recipe.launch.num_nodes,
                                    explicit_cloud=bool(opts.cloud))
    res["image_id"] = _docker(opts.image or recipe.launch.image or default_image(recipe))
    disk = opts.disk or recipe.launch.disk_gb
    if not disk and (disk := disk_for(recipe)) and recipe.data.format == "vision":
        # The model formula knows nothing of the images (often an hf:// download): the
        # vision task's larger default stays the floor.
        disk = max(disk, int(res.get("disk_size") or 0))
    if disk:
        res["disk_size"] = disk
    if not managed:
        # Only managed jobs recover; SkyPilot warns about it on a plain launch.
        res.pop("job_recovery", None)
    return res


def _spot_mode(flag: bool | None, recipe_spot: bool) -> str:
    """--spot: spot only; --on-demand: never; neither: the recipe (default: prefer spot)."""
    if flag is not None:
        return "only" if flag else "never"
    return "prefer" if recipe_spot else "never"


def _candidates(gpus: list[Any], clouds: list[str | None], spot: str, num_nodes: int,
                explicit_cloud: bool) -> list[dict[str, Any]]:
    if num_nodes > 1:
        bad = [c for c in clouds if c and c.lower() in NO_MULTINODE_CLOUDS]
        if bad and explicit_cloud:
            raise SkytuneError(f"--cloud {bad[0]}: it has no multi-node clusters "
                               f"(launch.num_nodes {num_nodes}); use aws, gcp or lambda")
        clouds = [c for c in clouds if c not in bad]
    out = []
    for gpu in gpus:
        for cloud in clouds:
            has_spot = not cloud or cloud.lower() not in NO_SPOT_CLOUDS
            for use_spot in ((True, False) if spot == "prefer" else (spot == "only",)):
                if use_spot and not has_spot:
                    continue
                e: dict[str, Any] = {"accelerators": gpu} if gpu else {}
                e.update({"cloud": cloud} if cloud else {})
                out.append({**e, "use_spot": use_spot})
    if not out:
        where = ", ".join(c for c in clouds if c) or "any cloud"
        raise SkytuneError(f"--spot: no spot instances on {where}; drop --spot or choose "
                           "a cloud that has them (aws, gcp, vast, runpod)")
    return out


def _cloud_of(entry: dict[str, Any]) -> str | None:
    cloud = entry.get("cloud") or (entry.get("infra") or "").split("/")[0]
    return cloud or None


def _unique(items: list[Any]) -> list[Any]:
    return list(dict.fromkeys(x for x in items if x))


def _as_list(x: str | list[str] | None) -> list[str]:
    return [] if x is None else [x] if isinstance(x, str) else list(x)


def _docker(image: str) -> str:
    return image if image.startswith("docker:") else f"docker:{image}"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:50] or "job"


def default_image(recipe: Recipe | None = None) -> str:
    """skytune.images, the one place image tags live, decides (default, unsloth...);
    recipe None: the default image (what jobs/*.yaml name)."""
    from skytune import images

    return images.image_for(recipe) if recipe is not None else images.image_tag()


def disk_for(recipe: Recipe) -> int | None:
    """GB: 3 x bf16 model bytes (download, merged copy, slack) + 50 (image, data, logs);
    full fine-tuning adds two local checkpoints with Adam state (~10 bytes/param each).
    None when the size cannot be read off the model name (the task's default stays)."""
    billions = model_params_b(recipe.model)
    if billions is None:
        return None
    gb = 3 * 2 * billions + 50
    if recipe.adapter.type == "full":
        gb += 2 * 10 * billions
    return max(64, int(-(-gb // 10) * 10))


def model_params_b(model: str) -> float | None:
    """Parameters in billions from a hub id: Llama-3.1-8B -> 8, Mixtral-8x7B -> 56."""
    if model.startswith("tiny:"):
        return 0.0
    name = model.rsplit("/", 1)[-1]
    sizes = [float(a) * float(b) for a, b in re.findall(r"(\d+)x(\d+(?:\.\d+)?)[bB]", name)]
    sizes += [float(m) for m in re.findall(r"(?<![\d.x])(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", name)]
    return max(sizes) if sizes else None


# ---------------------------------------------------------------------------- checks


def local_secrets(recipe: Recipe) -> dict[str, str]:
    """Secret values from this machine: the environment, then ~/.aws/credentials.

    AWS keys go only to recipes that touch s3:// (a rented VM needs no more than that).
    """
    out = {k: os.environ[k] for k in SECRET_NAMES if os.environ.get(k)}
    if all(k in os.environ for k in DOCKER_SECRETS):  # an empty password is ECR's IAM login
        out.update({k: os.environ[k] for k in DOCKER_SECRETS})
    if not _uses_s3(recipe):
        return {k: v for k, v in out.items() if k not in AWS_SECRETS}
    if not out.get("AWS_ACCESS_KEY_ID"):
        out.update(_aws_credentials_file())
    return out


def _aws_credentials_file() -> dict[str, str]:
    path = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")).expanduser()
    profile = os.environ.get("AWS_PROFILE", "default")
    cp = configparser.ConfigParser()
    try:
        cp.read(path)
    except configparser.Error:
        return {}
    if not cp.has_section(profile):
        return {}
    keys = {"AWS_ACCESS_KEY_ID": "aws_access_key_id",
            "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
            "AWS_SESSION_TOKEN": "aws_session_token"}
    return {env: cp.get(profile, k) for env, k in keys.items() if cp.get(profile, k, fallback="")}


def _uses_s3(recipe: Recipe) -> bool:
    return '"s3://' in json.dumps(recipe.to_dict())


def _all(recipe: Recipe, section: str | None, key: str) -> list[str]:
    """A field's value in the recipe and in every stage that overrides it."""
    top = recipe.to_dict()
    found = [(top.get(section) or {}).get(key) if section else top.get(key)]
    for st in recipe.stages:
        found.append((st.get(section) or {}).get(key) if section else st.get(key))
    return [v for v in found if isinstance(v, str)]


def check(recipe: Recipe, secrets: dict[str, str]) -> None:
    """Refuse, before renting anything, what would fail or be lost on a cloud VM."""
    for store in _all(recipe, "output", "store"):
        if store.startswith("file://"):
            raise SkytuneError(f"output.store {store}: the VM's disk is lost when it stops: "
                               "set output.store to s3://bucket/prefix or hf://org/repo")
    for key in ("model", "init_from"):
        for p in _all(recipe, None, key):
            if _existing_path(recipe, p):
                raise SkytuneError(f"{key} {p}: a local path the VM cannot see; push it to "
                                   "the Hub or a store and use that URL (hf://... or s3://...)")
    if "HF_TOKEN" not in secrets:
        for m in _all(recipe, None, "model"):
            if m.startswith(GATED_MODEL_PREFIXES):
                raise SkytuneError(f"model {m} is gated on the Hub: accept its licence on "
                                   "huggingface.co, then export HF_TOKEN=hf_...")
        for url in _all(recipe, "output", "store") + _all(recipe, "output", "push"):
            if url.startswith("hf://"):
                raise SkytuneError(f"output: {url} needs a Hub token with write access: "
                                   "export HF_TOKEN=hf_...")
    if _uses_s3(recipe):
        if not (secrets.get("AWS_ACCESS_KEY_ID") and secrets.get("AWS_SECRET_ACCESS_KEY")):
            raise SkytuneError("the recipe uses s3:// but no AWS keys are set here: export "
                               "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or add them to "
                               "~/.aws/credentials)")
        endpoint = recipe.output.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or ""
        if any(h in endpoint for h in LOCAL_HOSTS):
            raise SkytuneError(f"S3 endpoint {endpoint} is this machine, which the VM cannot "
                               "reach: set output.endpoint_url to a public endpoint")


def _enabled_clouds() -> list[str]:
    """Clouds `sky check` enabled (lowercase). Asks the SkyPilot API server (starting the
    local one if needed: a few seconds), so it also works with a remote server."""
    sky = _sky()
    from sky.client import sdk

    try:
        return [str(c).lower() for c in sky.get(sdk.enabled_clouds())]
    except Exception as e:  # noqa: BLE001 (API server errors of many kinds: say what to run)
        raise SkytuneError(f"cannot ask SkyPilot which clouds are enabled "
                           f"({type(e).__name__}); run `sky check` and `sky api info`") from None


def _keep_enabled_clouds(config: dict[str, Any], enabled: list[str],
                         opts: LaunchOptions) -> dict[str, Any]:
    """Drop candidates on clouds `sky check` has not enabled; fail if none are left."""
    if not enabled:
        raise SkytuneError("no cloud is enabled in SkyPilot: run `sky check` "
                           "(and set up credentials for vast, lambda, runpod, aws or gcp)")
    if opts.cloud and opts.cloud.lower() not in enabled:
        raise SkytuneError(f"--cloud {opts.cloud} is not enabled (enabled: "
                           f"{', '.join(enabled)}); run `sky check {opts.cloud}`")
    res = config["resources"]
    entries = res.get("any_of")
    if not entries:
        return config
    kept = [e for e in entries if not _cloud_of(e) or _cloud_of(e).lower() in enabled]
    if not kept:
        wanted = ", ".join(_unique([_cloud_of(e) for e in entries]))
        raise SkytuneError(f"none of the task's clouds ({wanted}) is enabled (enabled: "
                           f"{', '.join(enabled)}); run `sky check` or set launch.clouds")
    config = copy.deepcopy(config)
    config["resources"]["any_of"] = kept
    return config


# ---------------------------------------------------------------------------- SkyPilot


def _sky():
    """`import sky`, without its database migrations logging through our INFO handler
    (alembic logs each plugin it loads as INFO on the root logger's handlers)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import sky

    return sky


def validate(config: dict[str, Any]) -> sky.Task:
    """SkyPilot's own schema and Task checks, offline. Secret values never pass here."""
    sky = _sky()

    try:
        return sky.Task.from_yaml_config(copy.deepcopy(config))
    except Exception as e:  # noqa: BLE001 (ValueError, AssertionError, sky.exceptions...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SkytuneError(f"the rendered task is not valid for SkyPilot: {first}") from None


def sky_task(config: dict[str, Any], secrets: dict[str, str]) -> sky.Task:
    """The Task to launch: built without secret values (SkyPilot keeps and ships a YAML copy
    of the config it was built from), then the values added, living only in Task.secrets."""
    config = copy.deepcopy(config)
    declared = config.get("secrets") or {}
    send = [k for k, v in declared.items() if v is None and secrets.get(k)]
    config.pop("secrets", None)  # unused ones ("") are not sent at all
    task = validate(config)
    task.update_secrets({k: secrets[k] for k in send})
    return task


def _sky_launch(config: dict[str, Any], secrets: dict[str, str], recipe: Recipe,
                managed: bool) -> str:
    sky = _sky()
    task = sky_task(config, secrets)
    name = config["name"]
    if managed:
        job_ids, _ = sky.stream_and_get(sky.jobs.launch(task, name=name))
        job_id = job_ids[0] if job_ids else None
        code = sky.jobs.tail_logs(job_id=job_id, follow=True)
        where, logs = f"managed job {job_id}", f"sky jobs logs {job_id}"
    else:
        # down=True: after idle_minutes_to_autostop the cluster is deleted, not stopped
        # (vast, runpod and lambda cannot stop; a stopped disk still bills elsewhere).
        job_id, _ = sky.stream_and_get(sky.launch(
            task, cluster_name=name, down=True,
            idle_minutes_to_autostop=recipe.launch.idle_minutes_to_autostop))
        code = sky.tail_logs(name, job_id, follow=True)
        where, logs = f"job {job_id} on {name}", f"sky logs {name} {job_id}"
    if code:
        raise TrainingFailed(f"{where} exited with code {code}; see `{logs}`")
    return f"{where} finished; artifacts in {recipe.store_url()}"


# ---------------------------------------------------------------------------- output


def to_yaml(config: dict[str, Any], task_path: Path, recipe_path: Path,
            secrets: dict[str, str], written_to: Path | None = None) -> str:
    """The rendered task with a runnable header. Secret names only, never values."""
    sent = [k for k, v in config.get("secrets", {}).items() if v is None]
    flags = " ".join(f"--secret {k}" for k in sent)
    head = [f"# Rendered by: skytune launch {recipe_path}   (from {task_path})",
            f"# Launch it as is: sky launch {written_to or '<this file>'} {flags}".rstrip(),
            "# Secrets sent from your environment (values never written): "
            + (", ".join(sent) or "none")]
    body = yaml.dump(config, Dumper=_BlockDumper, sort_keys=False, width=100)
    text = "\n".join(head) + "\n" + body
    for v in secrets.values():  # belt and braces: a value must never reach this text
        if v and len(v) >= 8 and v in text:
            raise SkytuneError("refusing to render the task: a secret value would appear in "
                               "it; move it out of the recipe and the task's envs")
    return text


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (setup, run) as `|` blocks, as they are written in jobs/*.yaml."""


def _str_block(dumper: yaml.SafeDumper, s: str) -> yaml.Node:
    style = "|" if "\n" in s else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)


_BlockDumper.add_representer(str, _str_block)


def _plan_text(recipe: Recipe, gpus: list[str]) -> str:
    """skytune.plan's table for the task's GPUs (the plan's own module: plain data)."""
    try:
        from skytune import plan as plan_mod
    except ImportError:
        plan_mod = None
    if not (hasattr(plan_mod, "plan") and hasattr(plan_mod, "render")):
        return "# plan: not available in this install (skytune.plan); the task above is valid"
    try:
        return plan_mod.render(plan_mod.plan(recipe, gpus=gpus or None))
    except SkytuneError as e:
        return f"# plan: {e}"


def local_env(config: dict[str, Any], staging: Path) -> dict[str, str]:
    """What one SkyPilot node's setup/run would see, with this machine's secrets."""
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (config.get("envs") or {}).items()})
    env.update(RECIPE=STAGED_RECIPE, SKYTUNE_JOB_DIR=str(staging))
    # The VM's image has skytune on PATH; here it is this venv's (python -m skytune.cli works
    # too), so the task runs this checkout rather than some other install.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({
        "SKYPILOT_NODE_RANK": "0",
        "SKYPILOT_NODE_IPS": "127.0.0.1",
        "SKYPILOT_NUM_NODES": "1",
        "SKYPILOT_NUM_GPUS_PER_NODE": str(_local_gpus()),
        "SKYPILOT_CLUSTER_INFO": json.dumps({"cluster_name": "local", "cloud": "local",
                                             "region": None, "zone": None}),
    })
    # No SKYPILOT_TASK_ID: the run id would then change on every local run (sync.run_id
    # hashes it), so `--resume auto` and `skytune pull RECIPE` would never find the run.
    env.pop("SKYPILOT_TASK_ID", None)
    return env


def _local_gpus() -> int:
    try:
        import torch  # only here: seconds to import, and absent from a CLI-only install
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
