"""Shared by the workflow scripts: log to the rule's log file, find the package, write tables atomically."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# In a --sdm conda environment the package is not installed: import it from this checkout.
_ROOT = str(Path(__file__).resolve().parents[1])
try:
    import scvae_torch  # noqa: F401
except ImportError:
    sys.path.insert(0, _ROOT)

from scvae_torch.io.atomic import write_h5ad, write_text  # noqa: E402, F401  (once the package can be found)


def start(snakemake, torch_threads: bool = False) -> None:
    """Send stdout, stderr (tqdm) and library logging to the rule's log file; optionally pin torch's threads."""
    log = open(snakemake.log[0], "a", buffering=1)
    sys.stdout = sys.stderr = log
    logging.basicConfig(stream=log, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    if torch_threads:
        import torch

        torch.set_num_threads(max(1, int(snakemake.threads)))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown(table) -> str:
    """A pandas DataFrame as a GitHub Markdown table (floats to 4 decimals)."""
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def write_table(table, tsv: str, md: str | None = None, title: str | None = None) -> None:
    """A table as TSV with a header row (full precision) and, next to it, as Markdown for people."""
    write_text(tsv, table.to_csv(sep="\t", index=False, float_format="%.10g"))
    if md:
        write_text(md, (f"# {title}\n\n" if title else "") + markdown(table))
