"""The SLURM profile against a real scheduler: the reduced pipeline through sbatch, GPU requests, a time-limit signal.

`.ci/run` starts a one-node SLURM cluster with two fake GPUs (../shared/slurm/start-local-slurm.sh,
FAKE_GPUS=2); without `sbatch` or a working `sinfo` the cluster test is skipped with the reason. The dry-run
test of the paper config needs no cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from workflow_copy import copy_workflow

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = shutil.which("snakemake")
TRAINING_RULES = ("train_final", "train_ablation")
SIGNAL_EPOCHS = 40

# A reduced pipeline (20 jobs) that still has every kind of job: data, grid, table 2 (a checkpoint), final
# training, evaluation, tables, clustering, figures. "pc" gives a final training long enough to be signalled.
SLURM_CONFIG = {
    "datasets": {
        "sim": {"simulate": {"kind": "single-cell", "n_cells": 300, "n_genes": 60, "n_types": 3, "seed": 0}},
        "pc": {"simulate": {"kind": "poisson-check", "n_cells": 20000, "n_features": 10, "seed": 0}},
    },
    "training": {"epochs": 3, "batch_size": 50, "checkpoint_every": 1, "device": "auto",
                 "resources": {"threads": 1, "runtime": 10, "mem_mb": 1000, "gpu": 0}},
    "gridsearch": {"datasets": ["sim"], "models": ["vae"], "likelihoods": ["poisson", "nb"], "encoders": [[16]],
                   "latents": [4], "epochs": 1, "resources": {"threads": 1, "runtime": 10, "mem_mb": 1000}},
    "evaluation": {"iw_samples": 5, "resources": {"threads": 1, "runtime": 10, "mem_mb": 1000}},
    "clustering": {"n_pcs": 5},
    "figures": {"figure2": {"dataset": "pc", "encoder": [16], "decoder": [16], "latent": 2,
                            "epochs": SIGNAL_EPOCHS, "lr": 0.01}},
}
SIGNALLED_RUN = "results/models/pc/vae-poisson"

if SNAKEMAKE is None:
    pytest.skip("the snakemake command is not on PATH", allow_module_level=True)
pytest.importorskip("snakemake_executor_plugin_slurm",
                    reason="the SLURM executor plugin is not installed (pip install -e '.[slurm]')")


def snakemake_env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def job_blocks(output: str, rule: str) -> list[str]:
    """The text of each job of a rule in Snakemake's (dry-run) job listing."""
    return [block.split("\n[")[0].split("\n\n")[0] for block in re.split(r"\n(?:local)?(?:rule|checkpoint) ", output)
            if block.startswith(f"{rule}:")]


def resources_of(block: str) -> dict[str, str]:
    """The 'resources:' line of a job block, as {name: value}."""
    line = next(line for line in block.splitlines() if line.strip().startswith("resources:"))
    return dict(item.split("=", 1) for item in line.split(":", 1)[1].strip().split(", ") if "=" in item)


# ---- the plan of the full reproduction (no cluster needed) ----------------------------------------------


def test_profile_plans_the_paper_reproduction_with_gpus_on_training_jobs(tmp_path):
    work = copy_workflow(tmp_path / "paper")
    proc = subprocess.run([SNAKEMAKE, "--profile", "profiles/slurm", "-n", "--configfile", "config/paper.yaml"],
                          cwd=work, env=snakemake_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Using profile profiles/slurm" in proc.stdout + proc.stderr
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    g = paper["gridsearch"]
    grid = [resources_of(b) for b in job_blocks(proc.stdout, "train_grid")]
    assert len(grid) == len(g["datasets"]) * len(g["models"]) * len(g["likelihoods"]) * len(g["encoders"]) * \
        len(g["latents"])
    finals = [resources_of(b) for b in job_blocks(proc.stdout, "train_final")]
    assert len(finals) == len(g["datasets"]) * len(g["models"]) * len(g["likelihoods"]) + 1  # + Figure 2's run
    ablation = [resources_of(b) for b in job_blocks(proc.stdout, "train_ablation")]
    schema = yaml.safe_load((ROOT / "config" / "schema.yaml").read_text())
    regs = schema["properties"]["figures"]["properties"]["figure5"]["properties"]["regularisations"]["default"]
    assert len(ablation) == len(paper["figures"]["figure5"].get("regularisations", regs))
    for res in finals + ablation:
        assert res["gpu"] == "1", res
        assert res["slurm_extra"] == "--signal=B:USR1@300", res
        assert res["runtime"] == str(paper["training"]["resources"]["runtime"])  # the config's, not the profile's
    for res in grid:
        assert res["gpu"] == "0" and res["slurm_extra"] == "--signal=B:USR1@300", res
    evaluate = [resources_of(b) for b in job_blocks(proc.stdout, "evaluate")]
    assert evaluate and all(res["gpu"] == "0" and "slurm_extra" not in res for res in evaluate)
    table1 = resources_of(job_blocks(proc.stdout, "table1")[0])  # default-resources of the profile
    assert (table1["mem_mb"], table1["runtime"]) == ("4000", "60")
    assert not (work / "results").exists()


GPU_SITE = {"cpu_partition": '"cpu"', "gpu_partition": '"gpu"', "gpu_model": '"a100"', "cpus_per_gpu": "8",
            "warning_seconds": "600"}


@pytest.mark.parametrize("site", [GPU_SITE, {**GPU_SITE, "gpus_per_training": "0"}], ids=["gpu-nodes", "no-gpus"])
def test_profile_site_settings_reach_the_plan(tmp_path, site):
    """The settings at the top of the profile (partitions, GPU model, no GPUs at all) decide each job's resources."""
    work = copy_workflow(tmp_path / "site")
    profile = work / "profiles" / "slurm" / "config.yaml"
    text = profile.read_text()
    for name, value in site.items():
        text, n = re.subn(rf"^(  - {name} = )\S+", rf"\g<1>{value}", text, count=1, flags=re.M)
        assert n == 1, f"site setting {name} is missing from the top of the profile"
    profile.write_text(text)
    proc = subprocess.run([SNAKEMAKE, "--profile", "profiles/slurm", "-n", "--configfile", "config/paper.yaml"],
                          cwd=work, env=snakemake_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    on_gpu = site.get("gpus_per_training", "1") != "0"
    for rule in ("train_final", "train_ablation", "train_grid", "evaluate", "table1"):
        blocks = job_blocks(proc.stdout, rule)
        assert blocks, rule
        for res in map(resources_of, blocks):
            if on_gpu and rule in TRAINING_RULES:
                assert (res["gpu"], res["slurm_partition"], res["gpu_model"], res["cpus_per_gpu"]) == \
                    ("1", "gpu", "a100", "8"), res
            else:
                assert res.get("gpu", "0") == "0" and res["slurm_partition"] == "cpu", (rule, res)
                assert "gpu_model" not in res and "cpus_per_gpu" not in res, (rule, res)
            assert res.get("slurm_extra") == ("--signal=B:USR1@600" if rule.startswith("train") else None), res


# ---- the reduced pipeline on the local SLURM cluster ----------------------------------------------------


def cluster_problem() -> str | None:
    """Why the SLURM test cannot run here, or None."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH: no SLURM cluster (CI starts one with ../shared/slurm/start-local-slurm.sh)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%a %G"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo failed: {err}"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()}"
    if "up" not in out.stdout.split():
        return f"no SLURM partition is up: {out.stdout.strip()!r}"
    if "gpu" not in out.stdout:
        return f"the cluster advertises no GPUs (start it with FAKE_GPUS=2): sinfo shows {out.stdout.strip()!r}"
    return None


def scontrol_jobs() -> dict[str, dict[str, str]]:
    """Every job slurmctld still knows (running, queued, or ended less than MinJobAge ago), by job id."""
    out = subprocess.run(["scontrol", "-d", "-o", "show", "job"], capture_output=True, text=True, timeout=300).stdout
    jobs = {}
    for line in out.splitlines():
        fields = dict(m.groups() for m in re.finditer(r"(\w+(?:/\w+)?)=(\S*)", line))
        if "JobId" in fields:
            jobs[fields["JobId"]] = fields
    return jobs


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    """Run the reduced pipeline with the SLURM profile; send the time-limit warning to one training job."""
    reason = cluster_problem()
    if reason:
        pytest.skip(reason)
    work = copy_workflow(tmp_path_factory.mktemp("slurm"))
    (work / "config" / "slurm-test.yaml").write_text(yaml.safe_dump(SLURM_CONFIG, sort_keys=False))
    profile = work / "profiles" / "slurm" / "config.yaml"
    text = profile.read_text()
    assert 'gpu_model = ""' in text
    profile.write_text(text.replace('gpu_model = ""', 'gpu_model = "fake"'))  # the local cluster's GPU type
    log = work / "snakemake.out"
    cmd = [SNAKEMAKE, "--profile", "profiles/slurm", "--configfile", "config/slurm-test.yaml",
           "--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs"]
    seen: dict[str, dict[str, str]] = {}
    signalled: dict[str, str] = {}
    earlier = set(scontrol_jobs())  # jobs of earlier runs stay visible for MinJobAge
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=snakemake_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while proc.poll() is None:
                if time.monotonic() - started > 900:
                    raise AssertionError(f"the SLURM run took over 15 minutes:\n{log.read_text()[-4000:]}")
                ours = {i: j for i, j in scontrol_jobs().items() if i not in earlier and j.get("WorkDir") == str(work)}
                seen.update(ours)
                training_log = work / "results" / "logs" / "models" / "pc" / "vae-poisson.log"
                if not signalled and training_log.exists() and "epoch 2/" in training_log.read_text():
                    job = next((i for i, j in ours.items() if j["JobState"] == "RUNNING"
                                and j.get("Comment", "").startswith("rule_train_final_wildcards_pc")), None)
                    if job:  # what --signal=B:USR1@N in the profile makes SLURM do N seconds before the limit
                        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=300)
                        signalled["job"] = job
                time.sleep(1)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                subprocess.run(["scancel", *[i for i, j in seen.items() if j["JobState"] in ("PENDING", "RUNNING")]])
    seen.update({i: j for i, j in scontrol_jobs().items() if i not in earlier and j.get("WorkDir") == str(work)})
    output = log.read_text()
    assert proc.returncode == 0, f"snakemake --profile profiles/slurm failed:\n{output[-6000:]}"
    return {"work": work, "output": output, "jobs": seen, "signalled": signalled.get("job"),
            "seconds": time.monotonic() - started}


def job_stats(output: str) -> dict[str, int]:
    """The 'Job stats' table Snakemake prints before it starts, as {rule: number of jobs}."""
    table = output.split("Job stats:\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return {rule: int(n) for rule, n in map(str.split, table) if rule != "total"}


def local_rules(work: Path) -> set[str]:
    """Rules the workflow runs on the submitting machine (`localrules:` or `localrule: True`), never as SLURM jobs."""
    local: set[str] = set()
    for path in [work / "Snakefile", *sorted((work / "rules").glob("*.smk"))]:
        rule, listing = None, False
        for line in path.read_text().splitlines():
            indented = line[:1] in (" ", "\t")
            if line.startswith("localrules:"):
                listing, line = True, line[len("localrules:"):]
            elif not indented:
                listing = False
            if listing:
                local.update(name for name in re.split(r"[\s,]+", line) if name)
            header = re.match(r"(?:rule|checkpoint) (\w+):", line)
            rule = header.group(1) if header else rule if indented or not line.strip() else None
            if rule and re.fullmatch(r"\s+localrule:\s*True\s*", line):
                local.add(rule)
    return local


def rule_of(job: dict[str, str]) -> str:
    """The rule of a job, from the comment the plugin gives it (rule_NAME or rule_NAME_wildcards_...)."""
    return re.match(r"rule_(\w+?)(?:_wildcards_|$)", job["Comment"]).group(1)


def test_every_job_went_through_the_scheduler(slurm_run):
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", slurm_run["output"])
    planned = job_stats(slurm_run["output"])
    planned["train_final"] += 1  # the signalled training ran twice
    local = local_rules(slurm_run["work"]) | {"all"}
    assert not local & {"simulate_data", "split_data", "train_grid", "train_final", "evaluate", "cluster"}
    rules = sorted(rule for rule, n in planned.items() if rule not in local for _ in range(n))
    assert len(submitted) == len(rules) >= 12, "every job but the workflow's local rules is a SLURM job"
    jobs = slurm_run["jobs"]
    assert set(submitted) == set(jobs), "scontrol knows exactly the jobs Snakemake says it submitted"
    for job_id, job in jobs.items():
        state = "FAILED" if job_id == slurm_run["signalled"] else "COMPLETED"
        assert job["JobState"] == state, (job_id, job)
        assert job["JobName"].startswith("scvae_"), job  # slurm-jobname-prefix
    assert sorted(map(rule_of, jobs.values())) == rules
    ctld = Path("/var/log/slurm/slurmctld.log")
    if os.access(ctld, os.R_OK):
        text = ctld.read_text(errors="replace")
        for job_id in submitted:
            assert f"_slurm_rpc_submit_batch_job: JobId={job_id} " in text
            assert re.search(rf"_job_complete: JobId={job_id} (WEXITSTATUS|WTERMSIG)", text)
    logs = {p.stem for p in (slurm_run["work"] / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert set(submitted) <= logs, "the plugin keeps one SLURM log per job under .snakemake/slurm_logs"


def test_training_jobs_asked_for_a_gpu_and_the_rest_did_not(slurm_run):
    jobs = list(slurm_run["jobs"].values())
    training = [j for j in jobs if rule_of(j) in TRAINING_RULES]
    assert len(training) == 3 + 1  # sim: vae-poisson, vae-nb; pc: vae-poisson twice (signalled, then resumed)
    for job in training:
        assert job.get("TresPerJob") == "gres:gpu:fake:1", job  # asked: sbatch --gpus=fake:1 (gpu + gpu_model)
        assert job.get("JOB_GRES") == "gpu:fake:1", job  # and given one of the node's (fake) GPUs
    for job in jobs:
        if rule_of(job) not in TRAINING_RULES:
            assert "gpu" not in job.get("TresPerJob", "") + job.get("JOB_GRES", ""), job


def test_every_result_file_is_there(slurm_run):
    r = slurm_run["work"] / "results"
    for table in ("table1_datasets", "table2_gridsearch", "table3_test_elbo", "clustering_ari"):
        assert (r / "tables" / f"{table}.tsv").read_text().count("\n") >= 2, table
        assert (r / "tables" / f"{table}.md").stat().st_size > 0, table
    for figure in ("figure2_vae_synthetic_poisson", "learning_curves_sim", "latent_space_sim"):
        assert (r / "figures" / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
        assert (r / "figures" / f"{figure}.pdf").read_bytes()[:5] == b"%PDF-", figure
    for run in ("sim/vae-poisson", "sim/vae-nb", "pc/vae-poisson"):
        for name in ("checkpoint.pt", "history.tsv", "metrics.json", "test_metrics.json", "latent.h5ad"):
            assert (r / "models" / run / name).is_file(), (run, name)
    assert len(list((r / "grid" / "sim").glob("*/*/metrics.json"))) == 2


def test_fake_gpus_fall_back_to_the_cpu(slurm_run):
    """The jobs got fake GPUs (CUDA_VISIBLE_DEVICES set, no CUDA): --device auto trains on the CPU."""
    for run in ("sim/vae-poisson", "sim/vae-nb", "pc/vae-poisson"):
        metrics = json.loads((slurm_run["work"] / "results" / "models" / run / "metrics.json").read_text())
        assert (metrics["device"], metrics["device_name"]) == ("cpu", "cpu"), run


def test_time_limit_signal_stops_training_with_a_checkpoint_and_the_retry_resumes(slurm_run):
    assert slurm_run["signalled"], "the long training was never seen running"
    run = slurm_run["work"] / SIGNALLED_RUN
    # the batch shell dies of USR1, SLURM ends the job and SIGTERMs the step: the training checkpoints and stops
    # (its log is emptied when the job runs again; show-failed-logs copied it into Snakemake's output first)
    assert re.search(r"stopped by signal SIGTERM; checkpoint written to \S*checkpoint\.pt", slurm_run["output"])
    assert "returned non-zero exit status 143" in slurm_run["output"]  # 128 + SIGTERM
    text = (slurm_run["work"] / "results" / "logs" / "models" / "pc" / "vae-poisson.log").read_text()
    assert re.search(r"resuming \S+ from epoch \d+, minibatch \d+", text), text[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_trained"] == SIGNAL_EPOCHS
    assert 0 < metrics["epochs_this_run"] < SIGNAL_EPOCHS
    history = (run / "history.tsv").read_text().splitlines()
    assert [int(line.split("\t")[0]) for line in history[1:]] == list(range(1, SIGNAL_EPOCHS + 1))
    attempts = [j for j in slurm_run["jobs"].values() if j["Comment"].startswith("rule_train_final_wildcards_pc")]
    assert sorted(j["JobState"] for j in attempts) == ["COMPLETED", "FAILED"]
