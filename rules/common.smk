# Helpers shared by the rules: config checks the schema cannot express, run lists, architecture ids,
# the grid winner (read from the table2 checkpoint) and the final target list. No model logic here.

import sys

import jsonschema
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

try:  # the choices are the library's (scvae_torch.config): installed, or imported from this checkout
    import scvae_torch.config
except ImportError:
    sys.path.insert(0, workflow.basedir)
    import scvae_torch.config

MODELS = scvae_torch.config.MODELS
LIKELIHOODS = scvae_torch.config.LIKELIHOODS
Y_REGULARISATIONS = scvae_torch.config.Y_REGULARISATIONS
SIMULATE_KEYS = {
    "poisson-check": {"kind", "n_cells", "n_features", "seed"},
    "gmvae-mixture": {"kind", "n_cells", "n_features", "n_clusters", "seed"},
    "single-cell": {"kind", "n_cells", "n_genes", "n_types", "sparsity", "hard", "n_batches", "seed"},
}
SOURCES = ("simulate", "download", "file")
ENV = "../envs/scvae-torch.yaml"


wildcard_constraints:
    dataset=r"[A-Za-z0-9_-]+",
    model="|".join(MODELS),
    likelihood="|".join(LIKELIHOODS),
    arch=r"e\d+(?:-\d+)*_d\d+(?:-\d+)*_l\d+",
    reg="|".join(Y_REGULARISATIONS),
    group="models|ablation|uncorrected",
    run=rf"(?:{'|'.join(MODELS)})-(?:{'|'.join(LIKELIHOODS)})(?:-y(?:{'|'.join(Y_REGULARISATIONS)}))?",


def canonical(value):
    """Dicts with sorted keys, all the way down: params compare equal however a config orders its keys."""
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def dataset_spec(dataset, source=None):
    """A data set's config (or one source section of it), canonically ordered for params."""
    spec = config["datasets"][dataset]
    return canonical(spec[source] if source else spec)


def config_error(message):
    """Stop before any job runs with one line naming the config key at fault."""
    raise WorkflowError(f"config: {message}")


def validate_config():
    """Validate against config/schema.yaml (filling in its defaults); one line naming the key at fault."""
    # Snakemake's default-filling validator calls setdefault on a null the schema allows ('figures.figure2:
    # null' = skip, 'benchmark.peers.scvi: null' = off) and fails with an AttributeError: validate such
    # entries as absent, then put the nulls back.
    peers = config.get("benchmark", {}).get("peers") if isinstance(config.get("benchmark"), dict) else None
    nullable = [section for section in (config.get("figures"), peers) if isinstance(section, dict)]
    skipped = [(section, k) for section in nullable for k, v in section.items() if v is None]
    for section, key in skipped:
        del section[key]
    try:
        validate(config, schema="../config/schema.yaml")
    except WorkflowError as err:
        cause = err.__context__  # Snakemake raised its error while handling jsonschema's
        if not isinstance(cause, jsonschema.ValidationError):
            raise
        key = ".".join(str(p) for p in cause.absolute_path) or "(top level)"
        config_error(f"{key}: {cause.message}")
    finally:
        for section, key in skipped:
            section[key] = None


validate_config()


# ---- data sets -------------------------------------------------------------------------------------


def source_of(dataset):
    """Which of simulate / download / file a data set comes from."""
    return next(s for s in SOURCES if s in config["datasets"][dataset])


def check_datasets():
    """Exactly one source per data set; only the simulation keys its kind understands."""
    for name, spec in config["datasets"].items():
        given = [s for s in SOURCES if s in spec]
        if len(given) != 1:
            config_error(
                f"datasets.{name}: give exactly one of {', '.join(SOURCES)} (got {given or 'none'})"
            )
        if "simulate" in spec:
            kind = spec["simulate"]["kind"]
            wrong = set(spec["simulate"]) - SIMULATE_KEYS[kind]
            if wrong:
                config_error(
                    f"datasets.{name}.simulate: {', '.join(sorted(wrong))} not used by kind {kind}"
                )
        if "download" in spec and not ({"name", "url"} & set(spec["download"])):
            config_error(f"datasets.{name}.download: give a registry name or a url")


def labelled(dataset):
    """Whether the data set carries labels (simulated mixtures and cell types, or a file's labels column)."""
    spec = config["datasets"][dataset]
    if "simulate" in spec:
        return spec["simulate"]["kind"] != "poisson-check"
    return "labels" in spec.get("file", {})


def has_batch(dataset):
    """Whether the data set's canonical file has obs['batch']: simulated batches, or a file's or download's column."""
    spec = config["datasets"][dataset]
    if "simulate" in spec:
        return spec["simulate"].get("n_batches", 1) > 1
    return "batch" in spec.get("file", spec.get("download", {}))


def conditioned(dataset):
    """Whether the data set's models (grid, final, ablation) are conditioned on its batch (correct_batch)."""
    return has_batch(dataset) and config["datasets"][dataset].get("correct_batch", True)


def components(dataset):
    """GMVAE components for a data set: its own setting, the simulated number of groups, else model.components."""
    spec = config["datasets"][dataset]
    if "components" in spec:
        return spec["components"]
    sim = spec.get("simulate", {})
    defaults = {"gmvae-mixture": ("n_clusters", 5), "single-cell": ("n_types", 6)}
    if sim.get("kind") in defaults:
        key, default = defaults[sim["kind"]]
        return sim.get(key, default)
    return config["model"]["components"]


def datasets_from(source):
    """Names of the data sets with the given source, as a wildcard pattern (never empty)."""
    names = [d for d in config["datasets"] if source in config["datasets"][d]]
    return "|".join(names) if names else "(?!)"


def data_dir():
    """Folder of {data_dir} in file paths: config data_dir, else $SCVAE_SHARED_DATA, else ../shared/data."""
    import os

    return config.get("data_dir") or os.environ.get("SCVAE_SHARED_DATA") or "../shared/data"


def file_path(dataset):
    """A file data set's path, with a leading {data_dir} replaced by data_dir()."""
    import os

    path = config["datasets"][dataset]["file"]["path"]
    if not path.startswith("{data_dir}"):
        return path
    return os.path.join(data_dir(), path[len("{data_dir}"):].lstrip(os.sep))


def raw_input(wildcards):
    """The file prepare_data reads: the downloaded file, or the user's path."""
    spec = config["datasets"][wildcards.dataset]
    if "download" in spec:
        return f"resources/downloads/{wildcards.dataset}/raw"
    return file_path(wildcards.dataset)


def counts(dataset):
    return f"results/data/{dataset}/counts.h5ad"


def split(dataset):
    return f"results/data/{dataset}/split.tsv"


# ---- architectures and runs ------------------------------------------------------------------------


def arch_id(encoder, decoder, latent):
    """e100-250_d250-100_l50 for encoder [100, 250], decoder [250, 100], latent 50."""
    join = lambda layers: "-".join(str(n) for n in layers)
    return f"e{join(encoder)}_d{join(decoder)}_l{latent}"


def parse_arch(arch):
    """Inverse of arch_id."""
    enc, dec, lat = arch.split("_")
    layers = lambda text: [int(n) for n in text[1:].split("-")]
    return {"encoder": layers(enc), "decoder": layers(dec), "latent": int(lat[1:])}


def grid_archs():
    """Architecture ids of the grid: encoders x (decoders, or each encoder mirrored) x latents."""
    grid = config["gridsearch"]
    archs = []
    for enc in grid["encoders"]:
        decoders = grid["decoders"] if grid["decoders"] is not None else [enc[::-1]]
        for dec in decoders:
            for lat in grid["latents"]:
                archs.append(arch_id(enc, dec, lat))
    return list(dict.fromkeys(archs))


def grid_runs():
    """(dataset, model, likelihood) trained in full with the grid winner."""
    g = config["gridsearch"]
    return [(d, m, l) for d in g["datasets"] for m in g["models"] for l in g["likelihoods"]]


def fixed_runs():
    """(dataset, model, likelihood) -> architecture and optimiser overrides, for runs outside the grid."""
    fig2 = config["figures"].get("figure2")
    runs = {}
    if fig2 and (fig2["dataset"], "vae", "poisson") not in grid_runs():
        runs[(fig2["dataset"], "vae", "poisson")] = {
            "arch": arch_id(fig2["encoder"], fig2["decoder"], fig2["latent"]),
            "training": {"epochs": fig2["epochs"], "lr": fig2["lr"]},
        }
    return runs


def final_runs():
    return grid_runs() + list(fixed_runs())


def ablation_runs():
    """(dataset, likelihood, y_regularisation) of the Figure 5 GMVAE ablation."""
    fig5 = config["figures"].get("figure5")
    if not fig5:
        return []
    return [(fig5["dataset"], fig5["likelihood"], reg) for reg in fig5["regularisations"]]


def run_datasets():
    """Data sets with at least one trained model (final or ablation), in config order."""
    used = {d for d, _, _ in final_runs()} | {d for d, _, _ in ablation_runs()}
    return [d for d in config["datasets"] if d in used]


def latent_datasets():
    """Data sets drawn in a latent-space figure: the grid's and every labelled one with trained models."""
    grid = config["gridsearch"]["datasets"]
    return [d for d in run_datasets() if d in grid or labelled(d)]


def check_references():
    """Every data set named by an analysis exists; figures point at runs that will exist."""
    named = [("gridsearch.datasets", d) for d in config["gridsearch"]["datasets"]]
    named += [
        (f"figures.{fig}.dataset", spec["dataset"])
        for fig, spec in config["figures"].items()
        if spec
    ]
    for key, dataset in named:
        if dataset not in config["datasets"]:
            config_error(f"{key}: no data set named {dataset!r} under datasets")
    fig2 = config["figures"].get("figure2")
    if fig2 and config["datasets"][fig2["dataset"]].get("simulate", {}).get("kind") != "poisson-check":
        config_error(f"figures.figure2.dataset: {fig2['dataset']!r} is not a simulated poisson-check set")
    fig3 = config["figures"].get("figure3")
    if fig3 and (fig3["dataset"], "vae", "poisson") not in final_runs():
        config_error(
            "figures.figure3.dataset: needs a VAE-Poisson run on it "
            "(add it to gridsearch.datasets with vae and poisson)"
        )
    fig5 = config["figures"].get("figure5")
    if fig5 and not labelled(fig5["dataset"]):
        config_error(f"figures.figure5.dataset: {fig5['dataset']!r} has no labels")
    check_integration()
    if config["model"]["dispersion"] == "gene-batch":
        for dataset in run_datasets():
            if not conditioned(dataset):
                config_error(f"model.dispersion: gene-batch needs a batch on every trained data set, not on {dataset!r}")
    if abs(sum(config["split"]["fractions"]) - 1) > 1e-6:
        config_error("split.fractions: must sum to 1")
    for dataset in config["benchmark"]["datasets"]:
        if dataset not in config["gridsearch"]["datasets"]:
            config_error(f"benchmark.datasets: {dataset!r} is not in gridsearch.datasets (its models are compared)")
        if not labelled(dataset):
            config_error(f"benchmark.datasets: {dataset!r} has no labels")


def check_integration():
    """Integration data sets: in the grid with the integration model and likelihood, labelled, with a batch."""
    integ = config["integration"]
    for dataset in integ["datasets"]:
        where = f"integration.datasets: {dataset!r}"
        if dataset not in config["datasets"]:
            config_error(f"{where}: no data set of that name under datasets")
        if (dataset, integ["model"], integ["likelihood"]) not in grid_runs():
            config_error(f"{where}: needs a grid run of {integ['model']}-{integ['likelihood']} on it "
                         "(gridsearch.datasets, models and likelihoods)")
        if not labelled(dataset):
            config_error(f"{where}: has no labels")
        if not conditioned(dataset):
            config_error(f"{where}: has no batch to correct (file/download batch, simulate n_batches >= 2, "
                         "correct_batch true)")


check_datasets()
check_references()


# ---- per-run settings (passed to workflow_scripts/train.py as params) ------------------------------


def integration_runs():
    """(dataset, model, likelihood) scored by the integration table: the final run, and the same without batch."""
    integ = config["integration"]
    return [(d, integ["model"], integ["likelihood"]) for d in integ["datasets"]]


def integration_run():
    """The run folder name of the integration model, e.g. gmvae-nb."""
    return f"{config['integration']['model']}-{config['integration']['likelihood']}"


def model_config(dataset, model, likelihood, arch, batch=None, **overrides):
    """The library's model_config for one run: shared model options + architecture + data set's K. Without a
    batch covariate (batch False; None: whether the data set is conditioned) the options that need one are off."""
    cfg = dict(config["model"])
    if not (conditioned(dataset) if batch is None else batch):
        cfg["batch_encoder"] = False
        if cfg["dispersion"] == "gene-batch":  # the run without the covariate of the integration table
            cfg["dispersion"] = "gene"
    cfg.update(parse_arch(arch))
    cfg.update(model=model, likelihood=likelihood, components=components(dataset), **overrides)
    return canonical(cfg)


def train_config(**overrides):
    """The library's TrainConfig fields for one run."""
    cfg = {k: v for k, v in config["training"].items() if k != "resources"}
    cfg.update(overrides)
    if "epochs" in overrides and cfg.get("pretrain_epochs") is not None:
        # a short (grid) run pre-trains a GMVAE for at most half of its epochs (the library's default does)
        cfg["pretrain_epochs"] = min(cfg["pretrain_epochs"], cfg["epochs"] // 2)
    return canonical(cfg)


def winner(wildcards):
    """Best grid architecture of (dataset, model, likelihood), read from Table 2 (a checkpoint)."""
    import csv

    table = checkpoints.table2.get().output.tsv
    with open(table, newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if (row["dataset"], row["model"], row["likelihood"]) == (
                wildcards.dataset,
                wildcards.model,
                wildcards.likelihood,
            ):
                return row["architecture"]
    raise WorkflowError(f"{table}: no row for {wildcards.dataset} {wildcards.model}-{wildcards.likelihood}")


def final_arch(wildcards):
    key = (wildcards.dataset, wildcards.model, wildcards.likelihood)
    fixed = fixed_runs()
    return fixed[key]["arch"] if key in fixed else winner(wildcards)


def final_inputs(wildcards):
    """Data, split and, for grid runs, the winning grid run (so a new winner re-trains, nothing else does)."""
    inputs = {"data": counts(wildcards.dataset), "split": split(wildcards.dataset)}
    if (wildcards.dataset, wildcards.model, wildcards.likelihood) not in fixed_runs():
        inputs["winner"] = (
            f"results/grid/{wildcards.dataset}/{wildcards.model}-{wildcards.likelihood}/"
            f"{winner(wildcards)}/metrics.json"
        )
    return inputs


def final_params(wildcards, batch=None):
    """model_config, TrainConfig fields and batch switch of a final run (batch=False: the integration run
    without the covariate)."""
    key = (wildcards.dataset, wildcards.model, wildcards.likelihood)
    overrides = fixed_runs().get(key, {}).get("training", {})
    batch = conditioned(wildcards.dataset) if batch is None else batch
    return {
        "model": model_config(*key, final_arch(wildcards), batch=batch),
        "training": train_config(**overrides),
        "batch": batch,
    }


def resource(section, name):
    return config[section]["resources"][name]


# ---- targets ---------------------------------------------------------------------------------------


def model_dir(group, dataset, run):
    return f"results/{group}/{dataset}/{run}"


def run_dirs(dataset):
    """{label: model folder} of every trained run on a data set (final runs, then the ablation)."""
    dirs = {
        f"{m}-{l}": model_dir("models", d, f"{m}-{l}") for d, m, l in final_runs() if d == dataset
    }
    dirs.update(
        {
            f"gmvae-{l}-y{r}": model_dir("ablation", d, f"gmvae-{l}-y{r}")
            for d, l, r in ablation_runs()
            if d == dataset
        }
    )
    return dirs


def figure(name):
    return [f"results/figures/{name}.png", f"results/figures/{name}.pdf"]


def all_targets():
    """Every table and figure the config asks for (intermediate files follow from them)."""
    targets = [
        f"results/tables/{t}.{ext}"
        for t in ("table1_datasets", "clustering_ari")
        for ext in ("tsv", "md")
    ]
    if grid_runs():
        targets += [
            f"results/tables/{t}.{ext}"
            for t in ("table2_gridsearch", "table3_test_elbo")
            for ext in ("tsv", "md")
        ]
        for dataset in config["gridsearch"]["datasets"]:
            targets += figure(f"learning_curves_{dataset}")
    for dataset in latent_datasets():
        targets += figure(f"latent_space_{dataset}")
    names = {
        "figure2": "figure2_vae_synthetic_poisson",
        "figure3": "figure3_poisson_stability",
        "figure5": "figure5_gmvae_ablation",
    }
    targets += [f for key, name in names.items() if config["figures"].get(key) for f in figure(name)]
    if config["benchmark"]["datasets"]:
        targets += ["results/tables/benchmark.tsv", "results/tables/benchmark.md", *figure("benchmark")]
    if integration_runs():
        targets += ["results/tables/integration.tsv", "results/tables/integration.md", *figure("integration")]
    return targets


def ablation_params(wildcards):
    """model_config and TrainConfig fields of one Figure 5 ablation run."""
    fig5 = config["figures"]["figure5"]
    arch = arch_id(fig5["encoder"], fig5["decoder"], fig5["latent"])
    model = model_config(
        wildcards.dataset, "gmvae", wildcards.likelihood, arch, y_regularisation=wildcards.reg,
        cluster_posterior="encoder",  # the ablation is of q(y|x)'s regularisation: its clusters are q(y|x)'s
    )
    training = train_config(epochs=fig5["epochs"], lr=fig5["lr"], pretrain_epochs=fig5["pretrain_epochs"])
    return {"model": model, "training": training, "batch": conditioned(wildcards.dataset)}


def figure_run(figure, run):
    """Model folder of a run a figure is drawn from."""
    return model_dir("models", config["figures"][figure]["dataset"], run)


def figure2_inputs(wildcards):
    run = figure_run("figure2", "vae-poisson")
    return {
        "model": f"{run}/metrics.json",
        "feature_means": f"{run}/feature_means.tsv",
        "truth": f"results/data/{config['figures']['figure2']['dataset']}/truth.json",
    }


def figure5_inputs(wildcards):
    """Ablation latents (for q(y|x)) and the data set's clustering scores (for ARI)."""
    dataset = config["figures"]["figure5"]["dataset"]
    return {
        "latents": [
            f"{model_dir('ablation', d, f'gmvae-{l}-y{r}')}/latent.h5ad" for d, l, r in ablation_runs()
        ],
        "scores": f"results/clustering/{dataset}/scores.tsv",
    }


# ---- benchmark against peers (rules/benchmark.smk) -------------------------------------------------

SCVI_LIKELIHOODS = ("poisson", "nb", "zinb")  # the likelihoods scVI has
_peer_checked = {}


def scvi_python():
    """The interpreter the scVI job runs under: benchmark.peers.scvi.python, else the one running Snakemake."""
    import sys

    return config["benchmark"]["peers"]["scvi"]["python"] or sys.executable


def scvi_enabled():
    """Whether the scVI peer runs: switched on, and scvi-tools importable by its interpreter (else one log line)."""
    if config["benchmark"]["peers"].get("scvi") is None or not config["benchmark"]["datasets"]:
        return False
    if "scvi" not in _peer_checked:
        import subprocess

        from snakemake.logging import logger

        python = scvi_python()
        probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('scvi') is None)"
        try:
            found = subprocess.run([python, "-c", probe], capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            found = False
        if not found:
            logger.warning(
                f"benchmark: scvi-tools is not importable by {python}; the scVI peer is skipped "
                "(pip install 'scvae-torch[compare]', or set benchmark.peers.scvi.python)"
            )
        _peer_checked["scvi"] = found
    return _peer_checked["scvi"]


def scvi_runs():
    """(dataset, likelihood) of the scVI peer: each benchmark data set x each grid likelihood scVI has."""
    if not scvi_enabled():
        return []
    liks = [l for l in config["gridsearch"]["likelihoods"] if l in SCVI_LIKELIHOODS]
    return [(d, l) for d in config["benchmark"]["datasets"] for l in liks]


def scanpy_enabled():
    return config["benchmark"]["peers"].get("scanpy") is not None


def benchmark_inputs(wildcards):
    """Every file the benchmark table reads: scvae-torch's test metrics, clustering scores, peers, benchmarks."""
    g = config["gridsearch"]
    inputs = {"tests": [], "train_bench": [], "scores": [], "scvi": [], "scvi_bench": [], "scanpy": [], "scanpy_bench": []}
    for d in config["benchmark"]["datasets"]:
        for m in g["models"]:
            for l in g["likelihoods"]:
                inputs["tests"].append(f"{model_dir('models', d, f'{m}-{l}')}/test_metrics.json")
                inputs["train_bench"].append(f"results/benchmarks/models/{d}/{m}-{l}.tsv")
        inputs["scores"].append(f"results/clustering/{d}/scores.tsv")
        if scanpy_enabled():
            inputs["scanpy"].append(f"results/peers/{d}/scanpy/metrics.json")
            inputs["scanpy_bench"].append(f"results/benchmarks/peers/{d}/scanpy.tsv")
    for d, l in scvi_runs():
        inputs["scvi"].append(f"results/peers/{d}/scvi-{l}/metrics.json")
        inputs["scvi_bench"].append(f"results/benchmarks/peers/{d}/scvi-{l}.tsv")
    return inputs
