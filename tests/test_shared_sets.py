"""The benchmark studies' loader of the shared labelled sets (benchmarks/shared_sets.py): the singlets they claim."""

from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data import shared_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from shared_sets import demuxlet_calls, load_shared  # noqa: E402


def test_celseq2_singlets_drop_the_doublets_its_readme_lists():
    """cellbench_celseq2_3cl has no demuxlet column; its singlets must still exclude the 34 doublets that its README
    names (the independent reference: the README's list, not the table the loader reads)."""
    folder = shared_data()
    text = (folder / "cellbench_celseq2_3cl.README.md").read_text()
    listed = text.split("Their cell_ids:", 1)[1].strip().splitlines()[0].split()
    assert len(listed) == 34
    singlets = load_shared("cellbench_celseq2_3cl", top_genes=None, folder=folder)
    everyone = load_shared("cellbench_celseq2_3cl", top_genes=None, singlets=False, folder=folder)
    assert everyone.n_obs == 274 and singlets.n_obs == 274 - 34
    assert not set(listed) & set(singlets.obs_names)
    assert set(listed) <= set(everyone.obs_names)


def test_a_cell_without_a_demuxlet_call_stops_with_one_line(tmp_path):
    with gzip.open(tmp_path / "cellbench_3cl_2platforms.cells.tsv.gz", "wt") as f:
        f.write("cell_id\tcell_type\tbatch\tdemuxlet_cls\ncelseq2_A1\tH1975\tceleq2\tSNG\n")
    assert list(demuxlet_calls("cellbench_celseq2_3cl", np.array(["A1"]), tmp_path)) == ["SNG"]
    with pytest.raises(SystemExit, match=re.escape("no demuxlet call for 1 cells of cellbench_celseq2_3cl (e.g. "
                                                   "celseq2_B2)")):
        demuxlet_calls("cellbench_celseq2_3cl", np.array(["A1", "B2"]), tmp_path)
    assert demuxlet_calls("mouse_bladder_2100", np.array(["A1"]), tmp_path) is None
