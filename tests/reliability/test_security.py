"""Security: a checkpoint carrying code is refused without running it; no config value reaches a shell;
downloads only over http(s), never redirected elsewhere, and verified before the file takes its name.
(Data set names and wildcards: test_config_fuzz.py.)"""

from __future__ import annotations

import ast
import hashlib
import http.server
import os
import pickle
import re
import threading
from pathlib import Path

import pytest
import torch
from reliability_support import GUARANTEE, REFUSAL, ROOT, assert_one_line_error, cases, run_main

from scvae_torch import download
from scvae_torch.download import DownloadError, fetch
from scvae_torch.training import TrainingError, load_checkpoint

pytestmark = pytest.mark.reliability


# ---- checkpoints that carry code -------------------------------------------------------------------

class Payload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def evil_checkpoint(path: Path, marker: Path, how: str) -> Path:
    """A file that looks like a checkpoint and runs code when unpickled."""
    state = {"format": 1, "model_config": {"model": "vae"}, "model_state": {"w": torch.zeros(2)},
             "optimizer_state": Payload(marker)}
    if how == "zip":
        torch.save(state, path)
    elif how == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(state))
    return path


@REFUSAL
@pytest.mark.parametrize("how", ["zip", "legacy", "pickle"])
def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    path = evil_checkpoint(tmp_path / "checkpoint.pt", marker, how)
    with pytest.raises(TrainingError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a readable scvae-torch checkpoint") and "\n" not in message
    assert not marker.exists()
    # the payload is live: an unsafe load runs it (so the assertion above can fail)
    try:
        torch.load(evil_checkpoint(tmp_path / "control.pt", tmp_path / "control", how), weights_only=False)
    except RuntimeError:  # a plain pickle: torch fails on the magic number after unpickling it
        pass
    assert (tmp_path / "control").exists()


@REFUSAL
def test_evaluate_and_resume_refuse_a_run_folder_with_code_in_it(tmp_path):
    """Through the command line: one line naming the file, nothing executed, nothing written."""
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "checkpoint.pt", "checkpoint.prev.pt"):
        evil_checkpoint(run / name, marker, "zip")
    data = tmp_path / "counts.h5ad"
    from reliability_support import counts_matrix, write_h5ad

    write_h5ad(data, counts_matrix(50, 5))
    done = run_main("evaluate", str(run), "--data", str(data), "--out", str(tmp_path / "eval"), "--device", "cpu")
    assert_one_line_error(done, str(run / "best.pt"), code=2)
    done = run_main("train", "--data", str(data), "--out", str(run), "--epochs", "2", "--device", "cpu")
    assert_one_line_error(done, str(run / "checkpoint.pt"), str(run / "checkpoint.prev.pt"), code=2)
    assert not marker.exists()
    assert not any((tmp_path / "eval").iterdir())
    cases(2)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


PYTHON_FILES = sorted([*(ROOT / "scvae_torch").rglob("*.py"), *(ROOT / "workflow_scripts").glob("*.py")])


UNPICKLERS = ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.", "joblib.load", "pd.read_pickle",
              "pandas.read_pickle", "torch.jit.load")


@GUARANTEE
def test_every_torch_load_is_weights_only_and_nothing_else_unpickles():
    loads = []
    for path in PYTHON_FILES:
        for call, name in _calls(ast.parse(path.read_text())):
            keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
            if name == "torch.load":
                assert keywords.get("weights_only") == "True", f"{path.name}: {ast.unparse(call)}"
                loads.append(path.name)
            assert not name.startswith(UNPICKLERS), f"{path.name}: {ast.unparse(call)}"
            assert keywords.get("allow_pickle") != "True", f"{path.name}: {ast.unparse(call)}"
    assert loads == ["checkpoints.py"], loads  # one loader: load_checkpoint


# ---- no shell --------------------------------------------------------------------------------------

SAFE_PLACEHOLDERS = re.compile(r"\{(threads|resources\.\w+)\}")


def unquoted_shell_placeholders(text: str) -> list[str]:
    """Placeholders in `shell:` blocks of Snakemake rules that are not quoted with ':q'."""
    found = []
    for block in re.findall(r"^\s+shell:\s*\n((?:\s{8,}.*\n?)+)", text, re.M):
        for placeholder in re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", block):
            if not placeholder.endswith(":q") and not SAFE_PLACEHOLDERS.fullmatch("{" + placeholder + "}"):
                found.append(placeholder)
    return found


@GUARANTEE
def test_no_config_value_reaches_a_shell_unquoted():
    """Rules run scripts (script:), not shell strings; a shell: block must quote every placeholder with :q;
    no Python file of the package or the workflow starts a shell."""
    bad_rule = "rule x:\n    shell:\n        \"cp {input} {output:q} && echo {params.name:q} {threads}\"\n"
    assert unquoted_shell_placeholders(bad_rule) == ["input"]  # the check itself can fail
    rules = [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]
    for path in rules:
        assert unquoted_shell_placeholders(path.read_text()) == [], path.name
    shells = []
    for path in PYTHON_FILES:
        for call, name in _calls(ast.parse(path.read_text())):
            if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                shells.append(f"{path.name}: {ast.unparse(call)}")
            if any(k.arg == "shell" and ast.unparse(k.value) != "False" for k in call.keywords):
                shells.append(f"{path.name}: {ast.unparse(call)}")
    assert shells == []


# ---- downloads -------------------------------------------------------------------------------------

PAYLOAD = b"counts " * 1000


class Handler(http.server.BaseHTTPRequestHandler):
    """/data: the payload; /to?URL: a 302 redirect to URL."""

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/to?"):
            self.send_response(302)
            self.send_header("Location", self.path[4:])
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@REFUSAL
@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x.h5"])
@pytest.mark.parametrize("route", ["direct", "redirect"])
def test_only_http_downloads_even_after_a_redirect(tmp_path, server, target, route):
    url = target if route == "direct" else f"{server}/to?{target}"
    dest = tmp_path / "raw.h5"
    refused = "only http:// and https://|Redirection to url .* is not allowed"  # ours, or urllib's own check
    with pytest.raises(DownloadError, match=refused):
        fetch(url, dest, retries=0, timeout=60)
    assert list(tmp_path.iterdir()) == []
    done = run_main("download", url, "--out", str(dest), "--retries", "0")
    assert re.search(refused, assert_one_line_error(done, target, code=2))
    assert list(tmp_path.iterdir()) == []


@GUARANTEE
def test_a_download_is_verified_before_it_takes_its_name(tmp_path, server, monkeypatch):
    """The checksum is compared while the file is still NAME.part; only a match is renamed to NAME."""
    events = []
    real_replace, real_mismatch = os.replace, download._mismatch
    monkeypatch.setattr(download.os, "replace", lambda a, b: (events.append(("rename", Path(b).name)),
                                                              real_replace(a, b))[1])
    monkeypatch.setattr(download, "_mismatch", lambda *a: (events.append(("verify",)), real_mismatch(*a))[1])
    good = hashlib.sha256(PAYLOAD).hexdigest()
    dest = tmp_path / "raw.h5"
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        fetch(f"{server}/data", dest, sha256="0" * 64, retries=0, timeout=60)
    assert events == [("verify",)] and list(tmp_path.iterdir()) == []
    events.clear()
    assert fetch(f"{server}/data", dest, sha256=good, retries=0, timeout=60) == good
    assert events == [("verify",), ("rename", "raw.h5")] and dest.read_bytes() == PAYLOAD
    cases(2)


@GUARANTEE
def test_the_pipeline_downloads_through_the_verifying_fetch_only():
    """The download rule's script calls fetch/fetch_dataset with the config's checksums, nothing else fetches."""
    script = (ROOT / "workflow_scripts" / "download.py").read_text()
    called = {name for _, name in _calls(ast.parse(script))}
    assert {"fetch", "fetch_dataset"} <= called
    assert 'spec.get("sha256")' in script and 'spec.get("md5")' in script
    for path in PYTHON_FILES:
        text = path.read_text()
        if path.name != "download.py":
            assert "urllib.request" not in text and "requests." not in text and "urlopen" not in text, path.name
