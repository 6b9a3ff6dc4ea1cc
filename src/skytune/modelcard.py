"""The README.md model card of a merged model (or a pushed adapter): what it is and how it came to be.

    card = model_card(meta, recipe_yaml=..., metrics=rows, verification=report, kind="merged")
    (out / "README.md").write_text(card)

Everything comes from the artifact itself (skytune.json, recipe.yaml) and the run's
metrics.jsonl, so a card can be rebuilt anywhere (STYLE rule 10).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_METRICS = ("loss", "eval_loss", "mean_token_accuracy", "eval_mean_token_accuracy",
            "train_loss", "train_runtime", "reward", "rewards/accuracies")


def final_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The last value of each interesting metric in metrics.jsonl rows (later rows win)."""
    out: dict[str, Any] = {}
    for row in rows:
        for k in _METRICS:
            if isinstance(row.get(k), (int, float)):
                out[k] = round(float(row[k]), 4)
        if "step" in row and any(k in row for k in _METRICS):
            out["step"] = row["step"]
    return out


def parse_metrics(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def data_hash(paths: list[str]) -> str | None:
    """sha256 (12 hex) over the local data files, in order; None when one is remote/missing."""
    h = hashlib.sha256()
    for p in paths:
        f = Path(p)
        if "://" in p or not f.is_file():
            return None
        with open(f, "rb") as fh:
            while b := fh.read(1 << 20):
                h.update(b)
    return h.hexdigest()[:12] if paths else None


def model_card(meta: dict[str, Any], *, recipe_yaml: str | None = None,
               metrics: dict[str, Any] | None = None, verification: dict[str, Any] | None = None,
               kind: str = "merged", notes: list[str] | None = None) -> str:
    base = meta.get("base_model") or "unknown"
    recipe = meta.get("recipe") or {}
    adapter = recipe.get("adapter") or {}
    method = meta.get("method") or recipe.get("method") or "?"
    what = ("the LoRA adapter merged into its full-precision base" if kind == "merged"
            else "a LoRA adapter")
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: " + ("transformers" if kind == "merged" else "peft"),
        "tags: [skytune, " + method + ("" if kind != "merged" else ", merged-lora") + "]",
        "---",
        "",
        f"# {recipe.get('name') or meta.get('run_id') or 'skytune model'}",
        "",
        f"Fine-tuned with skytune ({method}); this repository holds {what}.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| method | {method} |",
        f"| adapter | {meta.get('adapter_type') or adapter.get('type', '?')}"
        + (f", r={adapter.get('r')}, alpha={adapter.get('alpha')}" if adapter.get("r") else "")
        + " |",
        f"| run | `{meta.get('run_id', '?')}`, step {meta.get('step', '?')} |",
        (f"| data | `{(recipe.get('data') or {}).get('train', '?')}` "
         f"(sha256 {meta.get('data_hash') or 'not recorded'}) |"),
    ]
    if kind == "merged":
        lines.append(f"| merged dtype | {meta.get('dtype', '?')} |")
        if meta.get("qlora_base"):
            lines.append(f"| QLoRA merge base | {meta['qlora_base']} |")
    lines.append(f"| skytune | {meta.get('skytune_version', '?')} |")
    if metrics:
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items()]
    if verification:
        v = verification
        lines += ["", "## Merge verification", "",
                  (f"Logits of the merged model vs. base + adapter (unmerged, PEFT) on "
                   f"{v.get('prompts')} fixed prompts ({v.get('positions')} positions), computed "
                   f"in {v.get('compute_dtype')} on {v.get('device')}: max |Δlogit| = "
                   f"{v.get('max_abs'):.3g} (tolerance {v.get('tol_max_abs'):.3g}), mean KL = "
                   f"{v.get('kl_mean'):.3g} (tolerance {v.get('tol_kl'):.3g}), top-1 agreement "
                   f"{v.get('top1_agree'):.4f}. **{'passed' if v.get('passed') else 'FAILED'}**")]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if recipe_yaml:
        lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```"]
    return "\n".join(lines) + "\n"
