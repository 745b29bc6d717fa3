"""A fresh copy of the workflow (no results) for tests that run the real snakemake CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ("Snakefile", "rules", "workflow_scripts", "config", "envs", "report", "profiles")


def copy_workflow(dest: Path) -> Path:
    """Copy the Snakefile, rules, scripts, configs, envs, report captions and profiles into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table Snakemake prints (first one), as {rule: count}."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Job stats:"))
    counts = {}
    for line in lines[start + 3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts
