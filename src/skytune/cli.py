"""skytune's command line. Thin: parse, call one library function, render, exit.

    skytune train jobs/recipes/demo.yaml --set train.max_steps=20
    skytune launch jobs/recipes/demo.yaml --local
    skytune pull file://runs/demo-1a2b3c4d --what adapter --to models/demo

Heavy libraries (torch, transformers, sky, boto3) are imported inside the commands that
need them so `skytune --help` stays instant. Library code raises SkytuneError; `main`
turns it into one line on stderr and exit code 2 (1 for a training failure).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from skytune.errors import SkytuneError

app = typer.Typer(
    name="skytune",
    help="Fine-tune LLMs from a YAML recipe, here or on rented GPUs through SkyPilot.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key: --set train.lr=1e-4 (repeatable)."),
]
RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]


def abort(message: str, code: int = 2) -> NoReturn:
    """The one place the CLI exits on an error: one line, no traceback."""
    typer.echo(f"error: {message}", err=True)
    sys.exit(code)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
        handlers=[RichHandler(console=_console(), show_path=False, show_time=False)],
        force=True,
    )


@app.command()
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    resume: Annotated[str, typer.Option(help="auto: newest complete checkpoint in the store; "
                                        "never: start fresh; or a checkpoint path/URL.")] = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Load data and model, run no "
                                          "step, print what would happen.")] = False,
) -> None:
    """Train here: data -> model + adapter -> TRL trainer -> checkpoints in the store.

    Example: skytune train jobs/recipes/demo.yaml --set train.max_steps=20
    """
    _setup_logging()
    from skytune.recipe import load_recipe
    from skytune.train import run

    r = load_recipe(recipe, set_ or [])
    result = run(r, resume=resume, dry_run=dry_run)
    typer.echo(json.dumps(result, indent=1) if dry_run else _summary(result))


def _summary(result: dict) -> str:
    if result.get("stages"):
        return "\n".join(_summary(s) for s in result["stages"])
    return (f"{result['run_id']}: {result['status']} at step {result.get('step')} -> "
            f"{result.get('run_url')}")


@app.command()
def launch(
    recipe: RecipeArg,
    task: Annotated[Path | None, typer.Option(help="SkyPilot task to use instead of "
                                              "jobs/<method>.yaml.")] = None,
    gpu: Annotated[str | None, typer.Option(help="Accelerator, e.g. H100:1 or A100-80GB:8.")] = None,
    cloud: Annotated[str | None, typer.Option(help="Cloud, e.g. vast, lambda, runpod, aws.")] = None,
    spot: Annotated[bool | None, typer.Option("--spot/--on-demand", help="Spot (default where "
                                              "the cloud has it) or on-demand.")] = None,
    managed: Annotated[bool, typer.Option(help="Managed job: recovered after preemption.")] = False,
    local: Annotated[bool, typer.Option(help="Run the task's setup and run here.")] = False,
    dryrun: Annotated[bool, typer.Option("--dryrun", help="Validate offline and print the "
                                         "task and the plan; launch nothing.")] = False,
    disk: Annotated[int | None, typer.Option(help="Disk size in GB.")] = None,
    image: Annotated[str | None, typer.Option(help="Docker image (default: skytune's).")] = None,
    set_: SetOpt = None,
) -> None:
    """Render the SkyPilot task for a recipe and launch it (or run it here with --local).

    Example: skytune launch jobs/recipes/demo.yaml --local
    """
    _setup_logging()
    from skytune import launch as launch_mod

    opts = launch_mod.LaunchOptions(
        task=task, gpu=gpu, cloud=cloud, spot=spot, managed=managed, disk=disk, image=image,
        overrides=set_ or [],
    )
    if local:
        code = launch_mod.run_local(recipe, opts)
        if code:
            abort(f"the task's run section exited with code {code}", code)
        return
    out = launch_mod.launch(recipe, opts, dryrun=dryrun)
    if out:
        typer.echo(out)


@app.command()
def plan(
    recipe: RecipeArg,
    gpu: Annotated[list[str] | None, typer.Option(help="Only these GPUs, e.g. --gpu H100 "
                                                  "--gpu A100-80GB:2.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    set_: SetOpt = None,
) -> None:
    """Memory, time and cost of a recipe on each GPU and cloud, cheapest feasible first.

    Example: skytune plan jobs/recipes/llama31-8b-lora.yaml --gpu H100 --gpu A100-80GB
    """
    from skytune import plan as plan_mod
    from skytune.recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    result = plan_mod.plan(r, gpus=gpu)
    typer.echo(json.dumps(result.to_dict(), indent=1) if json_ else plan_mod.render(result))


@app.command()
def merge(
    run_or_adapter: Annotated[str, typer.Argument(help="Run URL (store/run-id), or an adapter "
                                                  "directory.")],
    out: Annotated[Path | None, typer.Option(help="Where to write the merged model.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model (default: from the adapter's "
                                             "recipe).")] = None,
    dtype: Annotated[str, typer.Option(help="bf16, fp16 or fp32.")] = "bf16",
    verify: Annotated[bool, typer.Option(help="Compare merged vs unmerged logits.")] = True,
    upload: Annotated[bool, typer.Option(help="Upload merged/ to the run's store.")] = True,
    qlora_base: Annotated[str, typer.Option(help="QLoRA adapters: auto (nf4 on a GPU, else "
                                            "original), nf4 or original.")] = "auto",
) -> None:
    """Merge a LoRA adapter into its full-precision base, verify it, and save it.

    Example: skytune merge s3://bucket/skytune/demo-1a2b3c4d --out models/demo-merged
    """
    _setup_logging()
    from skytune import merge as merge_mod

    result = merge_mod.merge(run_or_adapter, out=out, base=base, dtype=dtype, verify=verify,
                             upload=upload, qlora_base=qlora_base)
    typer.echo(json.dumps(result, indent=1))


@app.command()
def pull(
    run: Annotated[str, typer.Argument(help="Run URL (store/run-id, e.g. "
                                       "s3://bucket/skytune/demo-1a2b3c4d) or a recipe file.")],
    what: Annotated[str, typer.Option(help="merged, adapter, or checkpoint[:STEP].")] = "adapter",
    to: Annotated[Path | None, typer.Option(help="Destination (default models/<run>/<what>).")]
    = None,
) -> None:
    """Download a finished artifact, verifying every file's sha256.

    Example: skytune pull file://runs/demo-1a2b3c4d --what adapter --to models/demo
    """
    from skytune import sync

    path = sync.pull(run, what=what, to=to)
    typer.echo(f"{what} in {path}")
    if what == "adapter":
        typer.echo(_LOAD_ADAPTER.format(path=path))


_LOAD_ADAPTER = """Load it with PEFT:
  from peft import AutoPeftModelForCausalLM; from transformers import AutoTokenizer
  model = AutoPeftModelForCausalLM.from_pretrained("{path}")
  tokenizer = AutoTokenizer.from_pretrained("{path}")"""


@app.command()
def runs(
    store: Annotated[str | None, typer.Argument(help="Store URL; default: file://runs.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List runs in a store: status, last complete step, artifacts and sizes.

    Example: skytune runs s3://my-bucket/skytune
    """
    from skytune import sync

    rows = sync.list_runs(store or "file://runs")
    if json_:
        typer.echo(json.dumps(rows, indent=1))
        return
    from rich.table import Table

    t = Table("run", "status", "step", "last checkpoint", "artifacts", "size")
    for r in rows:
        t.add_row(r["run_id"], r["status"], str(r.get("step") or ""),
                  str(r.get("last_checkpoint") or ""), ", ".join(r.get("artifacts", [])),
                  _size(r.get("bytes", 0)))
    from rich.console import Console

    Console().print(t)


@app.command()
def doctor(
    recipe: Annotated[Path | None, typer.Option(help="Also check this recipe's model and "
                                                "store.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Report versions, GPU, disk and credentials; exit non-zero if training cannot work here.

    Example: skytune doctor --recipe jobs/recipes/demo.yaml
    """
    from skytune import doctor as doctor_mod

    report = doctor_mod.run(recipe=recipe)
    typer.echo(json.dumps(report.to_dict(), indent=1) if json_ else doctor_mod.render(report))
    if not report.ok:
        raise typer.Exit(1)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> None:
    try:
        from typer._click import exceptions as click_exc  # typer >= 0.25 vendors click
    except ImportError:
        from click import exceptions as click_exc

    try:
        app(standalone_mode=False)
    except SkytuneError as e:
        abort(str(e), e.exit_code)
    except KeyboardInterrupt:
        abort("interrupted", 130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except click_exc.ClickException as e:  # usage errors: click's own message, exit 2
        e.show()
        sys.exit(e.exit_code)
    except click_exc.Abort:
        abort("aborted", 130)


if __name__ == "__main__":
    main()
