"""Environment check: can training work here? Versions, GPU, attention kernels, disk, secrets.

    from skytune import doctor
    report = doctor.run(recipe=Path("jobs/recipes/demo.yaml"))   # recipe is optional
    report.ok                  # False when training cannot work here (CLI: exit 1)
    print(doctor.render(report))
    json.dumps(report.to_dict())

Every problem comes with a fix. Missing or broken packages are reported, never raised; a
CPU-only machine is a warning (tiny models still train), not a failure. Fast: reads package
metadata, imports torch once, loads no model. Secrets are reported as set/unset only, and
their values are scrubbed from every string in the report as a second line of defence.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import platform
import re
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from skytune import __version__

if TYPE_CHECKING:
    from skytune.recipe import Recipe

# The torch the images lock and CI tests (tests/unit/test_images.py checks they agree).
TORCH_VERSION = "2.13.0"
# Packages reported, in this order; training needs the first block.
REQUIRED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")
OPTIONAL = ("bitsandbytes", "liger-kernel", "flash-attn", "kernels", "unsloth", "boto3",
            "huggingface-hub")
SECRET_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "WANDB_API_KEY")
STORE_TIMEOUT_S = 30.0
GB = 1024**3


@dataclass
class Problem:
    level: Literal["error", "warning"]
    what: str
    fix: str


@dataclass
class Report:
    versions: dict[str, str | None] = field(default_factory=dict)
    cuda: str | None = None
    cudnn: str | None = None
    attention: dict[str, bool] = field(default_factory=dict)
    gpus: list[dict[str, Any]] = field(default_factory=list)
    disk: dict[str, Any] = field(default_factory=dict)
    hf_token_set: bool = False
    store: dict[str, Any] | None = None
    image: str | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.level == "error" for p in self.problems)

    def error(self, what: str, fix: str) -> None:
        self.problems.append(Problem("error", what, fix))

    def warn(self, what: str, fix: str) -> None:
        self.problems.append(Problem("warning", what, fix))

    def to_dict(self) -> dict[str, Any]:
        return _scrub({"ok": self.ok, **asdict(self)})


def run(recipe: Path | None = None) -> Report:
    """Check this machine (and a recipe's model, backend and store). Raises SkytuneError only
    for a recipe file that does not load; everything else lands in the report."""
    r = None
    if recipe is not None:
        from skytune.recipe import load_recipe

        r = load_recipe(recipe)
    rep = Report(image=os.environ.get("SKYTUNE_IMAGE"))
    _check_versions(rep)
    torch = _import_torch(rep)
    if torch is not None:
        _check_gpu(rep, torch)
        _check_attention(rep, torch)
    rep.hf_token_set = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    if r is not None:
        _check_recipe(rep, r)
    _check_disk(rep, r)
    return rep


# ---------------------------------------------------------------------------------------
# Checks, each adding facts and problems to the report


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _tested_pins() -> dict[str, str]:
    """name -> version skytune's `train` extra pins (from installed metadata, no import)."""
    pins = {}
    try:
        reqs = md.requires("skytune") or []
    except md.PackageNotFoundError:  # run from a source tree (PYTHONPATH=src)
        reqs = []
    for req in reqs:
        m = re.match(r"^([A-Za-z0-9._-]+)\s*==\s*([^\s;,]+)", req)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _check_versions(rep: Report) -> None:
    rep.versions = {"python": platform.python_version(), "skytune": __version__}
    pins = {**_tested_pins(), "torch": TORCH_VERSION}
    for name in (*REQUIRED, *OPTIONAL):
        rep.versions[name] = v = _version(name)
        want = pins.get(name)
        if v is None and name in REQUIRED:
            spec = f"{name}=={want}" if want else name
            extra = ("; the PyPI wheel for Linux x86_64 is the CUDA 13 build"
                     if name == "torch" else " (or pip install 'skytune[train]')")
            rep.error(f"{name} not installed", f"pip install {spec}{extra}")
        # The unsloth image pins older transformers/TRL on purpose (images/README.md).
        elif v and want and v.split("+")[0] != want and rep.image != "unsloth":
            rep.warn(f"{name} {v} installed; skytune is tested with {want}",
                     f"pip install {name}=={want} (or use skytune's image)")


def _import_torch(rep: Report) -> Any:
    if rep.versions.get("torch") is None:
        return None
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - ABI mismatches, missing CUDA libs: all reported
        rep.error(f"torch {rep.versions['torch']} is installed but does not import: "
                  f"{type(e).__name__}: {_first_line(e)}",
                  f"reinstall it alone: pip install --force-reinstall torch=={TORCH_VERSION}")
        return None
    rep.cuda = torch.version.cuda
    if torch.backends.cudnn.is_available():
        v = torch.backends.cudnn.version()
        rep.cudnn = f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v and v >= 10000 else str(v)
    return torch


def _nvidia_present() -> bool:
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def _check_gpu(rep: Report, torch: Any) -> None:
    if not torch.cuda.is_available():
        if _nvidia_present() and torch.version.cuda is None:
            rep.error("this machine has an NVIDIA GPU but torch is a CPU-only build "
                      f"({rep.versions['torch']})",
                      f"pip install --force-reinstall torch=={TORCH_VERSION} (the default PyPI "
                      "wheel is the CUDA 13 build)")
        elif _nvidia_present():
            rep.error(f"torch (CUDA {torch.version.cuda}) cannot use the NVIDIA GPU here",
                      f"CUDA {torch.version.cuda} needs a newer NVIDIA driver (CUDA 13: >= 580); "
                      "check `nvidia-smi`, or pick machines with a newer driver")
        else:
            rep.warn("no CUDA GPU: training will run on CPU (tiny models only)",
                     "launch on a GPU: skytune launch RECIPE --gpu H100:1")
        return
    archs = set(torch.cuda.get_arch_list())
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        cap = f"{p.major}.{p.minor}"
        gpu = {"index": i, "name": p.name, "memory_gb": round(p.total_memory / GB, 1),
               "capability": cap, "bf16": p.major >= 8}
        rep.gpus.append(gpu)
        if archs and f"sm_{p.major}{p.minor}" not in archs:
            rep.warn(f"GPU {i} {p.name} (sm_{p.major}{p.minor}) has no kernels in this torch "
                     f"build ({', '.join(sorted(archs))})",
                     f"use skytune's image (torch {TORCH_VERSION}, CUDA 13) or a newer torch")
    if rep.gpus and not all(g["bf16"] for g in rep.gpus):
        rep.warn("a GPU without bf16 (compute capability < 8.0): training runs in fp16 or fp32, "
                 "slower and less stable", "use A100, L40S, H100 or newer (sm80+)")


def _check_attention(rep: Report, torch: Any) -> None:
    """What attention paths exist; images/ATTENTION.md says which skytune uses and why."""
    att = {
        "sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention"),
        "flex": importlib.util.find_spec("torch.nn.attention.flex_attention") is not None,
        "flash_attn": False,
        "liger": importlib.util.find_spec("liger_kernel") is not None,
    }
    if rep.versions.get("flash-attn"):
        # Importing is the only way to see the seeds' failure: a wheel built for another
        # torch raises "undefined symbol" here, not at pip install time.
        try:
            import flash_attn  # noqa: F401

            att["flash_attn"] = True
        except Exception as e:  # noqa: BLE001
            rep.warn(f"flash-attn {rep.versions['flash-attn']} is installed but broken "
                     f"({type(e).__name__}: {_first_line(e)})",
                     "pip uninstall -y flash-attn; skytune uses SDPA, which needs no compile")
    rep.attention = att


def _check_recipe(rep: Report, r: Recipe) -> None:
    if r.adapter.backend == "unsloth" and not rep.versions.get("unsloth"):
        from skytune.images import image_tag

        rep.error("recipe uses adapter.backend: unsloth but unsloth is not installed",
                  f"run in the Unsloth image ({image_tag('unsloth')}); its pins conflict with "
                  "the default stack, so do not pip install it here")
    if r.adapter.type == "qlora" and not rep.versions.get("bitsandbytes"):
        rep.error("recipe uses adapter.type: qlora but bitsandbytes is not installed",
                  "pip install bitsandbytes (it is in skytune's image)")
    hub_model = not (r.model.startswith(("tiny:", "random:")) or Path(r.path(r.model)).exists())
    if hub_model and not rep.hf_token_set:
        rep.warn(f"HF_TOKEN is not set; gated models ({r.model}?) will not download",
                 "export HF_TOKEN=hf_... here; for SkyPilot jobs pass it as a secret "
                 "(sky launch --secret HF_TOKEN)")
    rep.store = _check_store(rep, r)


def _check_store(rep: Report, r: Recipe) -> dict[str, Any]:
    url = r.store_url()
    out: dict[str, Any] = {"url": url, "reachable": False}
    result: list[BaseException | None] = []

    def probe() -> None:
        try:
            from skytune.store import open_store

            store = open_store(url, endpoint_url=r.output.endpoint_url)
            store.check()
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - reported below
            result.append(e)

    # A thread with a deadline: a black-holed endpoint must not hang doctor. The thread is a
    # daemon, so a stuck client dies with the process.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(STORE_TIMEOUT_S)
    if not result:
        rep.error(f"store {url}: no answer in {STORE_TIMEOUT_S:.0f} s", _store_fix(url))
    elif result[0] is None:
        out["reachable"] = True
    elif isinstance(result[0], ImportError):
        extra = "s3" if url.startswith("s3://") else "hub"
        rep.error(f"store {url}: {result[0].name or 'a client library'} is not installed",
                  f"pip install 'skytune[{extra}]'")
    else:
        rep.error(f"store {url} is not usable: {_first_line(result[0])}", _store_fix(url))
    return out


def _store_fix(url: str) -> str:
    if url.startswith("s3://"):
        return ("check AWS credentials (aws sts get-caller-identity), the bucket name and "
                "region, and output.endpoint_url / AWS_ENDPOINT_URL for R2 or MinIO")
    if url.startswith("hf://"):
        return "set HF_TOKEN to a token with write access to that repo or org"
    return "make the directory writable, or set output.store to a writable path"


def _model_bytes(r: Recipe) -> tuple[int | None, bool]:
    """(bf16 bytes of the model, already on disk?) from tiny/local config, the hub cache or
    skytune's table; (None, False) when unknown offline (no network here: doctor is fast)."""
    from skytune import models_catalog as mc

    try:
        local = Path(r.path(r.model))
        if r.model.startswith(("tiny:", "random:")) or local.is_dir():
            return 2 * mc.arch_for(r.model, r.base_dir).n_params(), True
        cached = _cached_hub_config(r.model)
        if cached is not None:
            return 2 * mc.from_config(cached, r.model).n_params(), False
        arch = mc.KNOWN.get(mc._known_key(r.model))
        return (2 * arch.n_params() if arch else None), False
    except Exception:  # noqa: BLE001 - a size estimate is best effort
        return None, False


def _cached_hub_config(model: str) -> dict[str, Any] | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        p = try_to_load_from_cache(model, "config.json")
        return json.loads(Path(p).read_text()) if isinstance(p, str) else None
    except Exception:  # noqa: BLE001
        return None


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")


def _free_bytes(path: Path) -> int:
    p = path.expanduser().resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _check_disk(rep: Report, r: Recipe | None) -> None:
    cache = _hf_home()
    free = _free_bytes(cache)
    rep.disk = {"path": str(cache), "free_gb": round(free / GB, 1), "needed_gb": None}
    if r is None:
        if free < 20 * GB:
            rep.warn(f"only {free / GB:.1f} GB free at {cache}",
                     "a 7-8B model needs ~16 GB to download plus room for checkpoints")
        return
    size, on_disk = _model_bytes(r)
    if size is None:
        rep.disk["note"] = f"size of {r.model} unknown offline; not checked"
        return
    # Download (unless local) + a merged copy + for full fine-tuning two checkpoints with
    # Adam state (~10 bytes/param each); 10% slack. Same model as launch.disk_for.
    params = size // 2
    need = (0 if on_disk else size) + (size if r.output.merge else 0)
    need += 2 * 10 * params if r.adapter.type == "full" else 0
    need = int(need * 1.1)
    rep.disk["needed_gb"] = round(need / GB, 1)
    if need > free:
        rep.error(f"not enough disk: {free / GB:.1f} GB free at {cache}, {r.model} needs "
                  f"~{need / GB:.0f} GB (download, merge, checkpoints)",
                  "free space, point HF_HOME at a bigger volume, or launch with --disk "
                  f"{max(64, int(need / GB) + 50)}")


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]


def _scrub(obj: Any) -> Any:
    """Replace any secret's value with '***' wherever it appears (belt and braces)."""
    secrets = [v for k in SECRET_ENVS if len(v := os.environ.get(k, "")) >= 6]
    if not secrets:
        return obj
    text = json.dumps(obj)
    for s in secrets:
        text = text.replace(json.dumps(s)[1:-1], "***")
    return json.loads(text)


# ---------------------------------------------------------------------------------------
# Rendering


def render(report: Report) -> str:
    d = report.to_dict()
    v = d["versions"]
    rows = [(k, v.get(k) or "-") for k in ("python", "skytune", *REQUIRED, *OPTIONAL)]
    rows.append(("CUDA / cuDNN", f"{d['cuda'] or '-'} / {d['cudnn'] or '-'}"))
    att = d["attention"]
    rows.append(("attention",
                 ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in att.items()) or "-"))
    for g in d["gpus"]:
        bf16 = "yes" if g["bf16"] else "no"
        rows.append((f"gpu {g['index']}",
                     f"{g['name']}, {g['memory_gb']} GB, sm {g['capability']}, bf16 {bf16}"))
    if not d["gpus"]:
        rows.append(("gpu", "none"))
    disk = d["disk"]
    need = f", needs ~{disk['needed_gb']} GB" if disk.get("needed_gb") is not None else ""
    rows.append(("disk", f"{disk.get('free_gb')} GB free at {disk.get('path')}{need}"))
    rows.append(("HF_TOKEN", "set" if d["hf_token_set"] else "not set"))
    if d["store"]:
        s = d["store"]
        rows.append(("store", f"{s['url']} {'reachable' if s['reachable'] else 'NOT reachable'}"))
    if d["image"]:
        rows.append(("image", d["image"]))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {val}" for k, val in rows]
    for p in d["problems"]:
        lines += [f"{p['level']}: {p['what']}", f"  fix: {p['fix']}"]
    lines.append("ok: training can run here" if d["ok"] else "NOT OK: fix the errors above")
    return "\n".join(lines)
