"""The pipeline's config schema: shipped configs validate, unknown keys fail naming the key, defaults and allowed
values equal the library's."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from scvae_torch import config as library
from scvae_torch.config import ModelConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((ROOT / "config" / "schema.yaml").read_text())
CONFIGS = ["config.yaml", "paper.yaml", "test.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / name).read_text())


def errors(config: dict) -> list[jsonschema.ValidationError]:
    return list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(config))


def schema_defaults(section: str) -> dict:
    props = SCHEMA["properties"][section]["properties"]
    return {k: v["default"] for k, v in props.items() if "default" in v}


def object_paths(schema: dict, path: tuple = ()) -> list[tuple]:
    """Every path in a config where the schema describes an object with named properties."""
    found = []
    if schema.get("type") in ("object", ["object", "null"]) and "properties" in schema:
        found.append(path)
        for key, sub in schema["properties"].items():
            sub = resolve(sub)
            found += object_paths(sub, path + (key,))
    return found


def resolve(sub: dict) -> dict:
    if "$ref" in sub:
        name = sub["$ref"].split("/")[-1]
        return {**SCHEMA["$defs"][name], **{k: v for k, v in sub.items() if k != "$ref"}}
    return sub


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate(name):
    assert errors(load(name)) == []


def test_schema_is_strict_everywhere():
    """Every object in the schema refuses unknown keys (so a misspelt key can never be ignored)."""
    def walk(node, where):
        if isinstance(node, dict):
            if node.get("type") in ("object", ["object", "null"]) and "properties" in node:
                assert node.get("additionalProperties") is False, f"{where} accepts unknown keys"
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")
    walk(SCHEMA, "schema")


def _config_with_every_section() -> dict:
    config = load("config.yaml")
    config["datasets"]["local"] = {"file": {"path": "x.h5ad"}}
    config["datasets"]["web"] = {"download": {"name": "10x-MB-20k"}}
    return config


def _instance_at(config: dict, path: tuple):
    """The object at a schema path in config (datasets.* resolved to a data set of the right kind)."""
    node = config
    for key in path:
        node = node.setdefault(key, {})
    return node


@pytest.mark.parametrize("path", [
    (), ("split",), ("model",), ("training",), ("training", "resources"), ("gridsearch",),
    ("gridsearch", "resources"), ("evaluation",), ("clustering",), ("figures",), ("figures", "figure2"),
    ("figures", "figure5"), ("datasets", "sim-sc"), ("datasets", "sim-sc", "simulate"),
    ("datasets", "local", "file"), ("datasets", "web", "download"), ("benchmark",), ("benchmark", "peers"),
    ("benchmark", "peers", "scvi"), ("benchmark", "peers", "scvi", "resources"), ("benchmark", "peers", "scanpy"),
    ("benchmark", "peers", "scanpy", "resources"), ("integration",),
])
def test_misspelt_key_is_refused_naming_it(path):
    config = _config_with_every_section()
    _instance_at(config, path)["lerning_rate"] = 1
    found = errors(config)
    assert found, f"a misspelt key under {'.'.join(path) or 'top level'} was accepted"
    assert any("lerning_rate" in e.message for e in found)
    assert any(tuple(e.absolute_path) == path for e in found)


def test_misspelt_key_test_covers_every_object_of_the_schema():
    """The parametrised test above reaches every object the schema defines (apart from data set names)."""
    covered = {(), ("split",), ("model",), ("training",), ("training", "resources"), ("gridsearch",),
               ("gridsearch", "resources"), ("evaluation",), ("evaluation", "resources"), ("clustering",),
               ("figures",), ("figures", "figure2"), ("figures", "figure3"), ("figures", "figure5"),
               ("benchmark",), ("benchmark", "peers"), ("benchmark", "peers", "scvi"),
               ("benchmark", "peers", "scvi", "resources"), ("benchmark", "peers", "scanpy"),
               ("benchmark", "peers", "scanpy", "resources"), ("integration",)}
    top = {p for p in object_paths(SCHEMA) if not p or p[0] != "datasets"}
    assert top <= covered, f"objects not covered: {top - covered}"


@pytest.mark.parametrize("name", ["../escape", "a/b", "a b", "x;rm", ""])
def test_unsafe_dataset_names_are_refused(name):
    config = load("config.yaml")
    config["datasets"][name] = {"simulate": {"kind": "poisson-check"}}
    assert errors(config)


@pytest.mark.parametrize("key, value", [
    (("training", "epochs"), 0), (("training", "lr"), 0), (("training", "device"), "tpu"),
    (("gridsearch", "likelihoods"), ["gaussian"]), (("gridsearch", "encoders"), [[0]]),
    (("split", "fractions"), [0.5, 0.5]), (("model", "dropout"), 1.0), (("training", "resources"), {"gpu": -1}),
])
def test_wrong_values_are_refused(key, value):
    config = copy.deepcopy(load("config.yaml"))
    _instance_at(config, key[:-1])[key[-1]] = value
    assert errors(config)


def test_download_urls_must_be_http_and_shell_safe():
    config = load("config.yaml")
    for url in ["file:///etc/passwd", "ftp://x/y", "http://x/$(rm -rf ~)", "http://x/a;b", "http://x/a b"]:
        config["datasets"]["web"] = {"download": {"url": url}}
        assert errors(config), url


TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}
MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)}


def test_training_defaults_mirror_trainconfig():
    """Defaults live in the schema; TrainConfig's defaults must be the same numbers."""
    schema = schema_defaults("training")
    library = dataclasses.asdict(TrainConfig())
    shared = set(schema) & set(library)
    assert shared >= {"epochs", "batch_size", "lr", "weight_decay", "kl_warmup", "seed", "device", "checkpoint_every"}
    assert {k: schema[k] for k in shared} == {k: library[k] for k in shared}
    assert set(schema) - {"resources"} <= TRAIN_KEYS, "schema 'training' keys the library does not know"


def test_model_defaults_mirror_modelconfig():
    schema = schema_defaults("model")
    library = dataclasses.asdict(ModelConfig(n_features=1))
    assert set(schema) <= MODEL_KEYS, f"schema 'model' keys the library does not know: {set(schema) - MODEL_KEYS}"
    assert {k: schema[k] for k in schema} == {k: library[k] for k in schema}


# Every enum of the schema and the library's tuple of the same values (the library is the source).
SCHEMA_ENUMS = {
    ("$defs", "model"): library.MODELS,
    ("$defs", "likelihood"): library.LIKELIHOODS,
    ("$defs", "format"): library.FORMATS,
    ("$defs", "simulate", "properties", "kind"): library.SIMULATIONS,
    ("properties", "model", "properties", "dispersion"): library.DISPERSIONS,
    ("properties", "model", "properties", "y_regularisation"): library.Y_REGULARISATIONS,
    ("properties", "model", "properties", "prior_y"): library.PRIORS_Y,
    ("properties", "model", "properties", "cluster_posterior"): library.CLUSTER_POSTERIORS,
    ("properties", "model", "properties", "prior_z_variance"): library.PRIOR_Z_VARIANCES,
    ("properties", "training", "properties", "device"): library.DEVICES,
    ("properties", "training", "properties", "precision"): library.PRECISIONS,
    ("properties", "training", "properties", "stream"): library.STREAMING,
    ("properties", "figures", "properties", "figure5", "properties", "regularisations", "items"):
        library.Y_REGULARISATIONS,
}


def _enum_paths(node, path=()) -> dict[tuple, list]:
    """Every `enum` in the schema, by the path of the object that holds it."""
    found = {}
    if isinstance(node, dict):
        if "enum" in node:
            found[path] = node["enum"]
        for key, value in node.items():
            found.update(_enum_paths(value, path + (key,)))
    return found


def test_schema_enums_equal_the_library_and_every_enum_is_tied_to_it():
    """The schema's allowed values are the library's (the library is the one source; the schema repeats them
    for the pipeline), and no enum in the schema is left unchecked."""
    enums = _enum_paths(SCHEMA)
    assert set(enums) == set(SCHEMA_ENUMS), f"enums not tied to the library: {set(enums) ^ set(SCHEMA_ENUMS)}"
    for path, values in SCHEMA_ENUMS.items():
        assert sorted(enums[path]) == sorted(values), ".".join(path)


def test_schema_defaults_outside_model_and_training_equal_the_library():
    """Defaults of the schema that the library also has (those of `model` and `training`: tests above)."""
    props = SCHEMA["properties"]
    assert tuple(props["split"]["properties"]["fractions"]["default"]) == library.DEFAULT_FRACTIONS
    assert props["evaluation"]["properties"]["iw_samples"]["default"] == library.IW_SAMPLES
    assert props["training"]["properties"]["stream_above_gb"]["default"] == library.STREAM_ABOVE_GB
    assert SCHEMA["$defs"]["file"]["properties"]["format"]["default"] == library.FORMATS[0] == "auto"
    integ = props["integration"]["properties"]
    import inspect

    from scvae_torch.integration import compare
    assert {k: integ[k]["default"] for k in ("n_pcs", "neighbours", "seed")} == {
        k: p.default for k, p in inspect.signature(compare).parameters.items() if k in ("n_pcs", "neighbours", "seed")}
    grid = props["gridsearch"]["properties"]
    assert grid["models"]["default"] == list(library.MODELS)
    assert grid["likelihoods"]["default"] == list(library.LIKELIHOODS)


def test_cli_defaults_are_the_library_defaults():
    """The command line's defaults and choices come from the library (scvae_torch.config)."""
    from scvae_torch.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    train = vars(parser.parse_args(["train", "--data", "d.h5ad", "--out", "run"]))
    model, training = dataclasses.asdict(ModelConfig(n_features=1)), dataclasses.asdict(TrainConfig())
    shared = set(train) & set({**model, **training})
    assert len(shared) >= 25, sorted(shared)
    for key in shared:
        assert train[key] == {**model, **training}[key], key
    prepare = {a.dest: a for a in commands["prepare"]._actions}
    assert tuple(prepare["format"].choices) == library.FORMATS
    assert tuple(prepare["stream"].choices) == library.STREAMING
    assert prepare["stream_above_gb"].default == library.STREAM_ABOVE_GB
    fractions = prepare["split_fractions"]
    assert fractions.type(fractions.default) == library.DEFAULT_FRACTIONS
    evaluate = {a.dest: a for a in commands["evaluate"]._actions}
    assert evaluate["iw_samples"].default == library.IW_SAMPLES
    simulate = {a.dest: a for a in commands["simulate"]._actions}
    assert tuple(simulate["kind"].choices) == library.SIMULATIONS


def test_every_model_option_is_configurable():
    """Every ModelConfig option except those set per run (architecture, model, likelihood) is in the schema."""
    per_run = {"n_features", "model", "likelihood", "encoder", "decoder", "latent", "batches"}  # batches: from data
    assert MODEL_KEYS - per_run <= set(schema_defaults("model")), MODEL_KEYS - per_run - set(schema_defaults("model"))


def test_every_key_is_described_in_config_readme():
    readme = (ROOT / "config" / "README.md").read_text()
    keys = set()

    def walk(schema):
        schema = resolve(schema)
        for key, sub in schema.get("properties", {}).items():
            keys.add(key)
            walk(sub)
        if isinstance(schema.get("additionalProperties"), dict):
            walk(schema["additionalProperties"])
    walk(SCHEMA)
    missing = sorted(k for k in keys if not re.search(rf"`{re.escape(k)}`", readme))
    assert not missing, f"config/README.md does not describe: {missing}"


@pytest.mark.parametrize("source", ["file", "download"])
def test_top_genes_is_a_data_set_key_of_read_files(source):
    config = _config_with_every_section()
    section = config["datasets"]["local" if source == "file" else "web"][source]
    for good in (1, 2000, None):
        section["top_genes"] = good
        assert errors(config) == [], good
    for bad in (0, -5, 2.5, "2000"):
        section["top_genes"] = bad
        assert [tuple(e.absolute_path) for e in errors(config)] == [
            ("datasets", "local" if source == "file" else "web", source, "top_genes")], bad



def test_batch_keys_of_data_sets():
    """A file's or download's batch column, simulated batches, the correct_batch switch; nothing else by those names."""
    config = _config_with_every_section()
    config["datasets"]["local"]["file"]["batch"] = "plate"
    config["datasets"]["web"]["download"]["batch"] = "donor"
    config["datasets"]["sim-sc"]["simulate"]["n_batches"] = 2
    config["datasets"]["sim-sc"]["correct_batch"] = False
    assert errors(config) == []
    for where, key, bad in ((("datasets", "local", "file"), "batch", ""), (("datasets", "sim-sc", "simulate"),
                            "n_batches", 0), (("datasets", "sim-sc"), "correct_batch", "yes")):
        broken = copy.deepcopy(config)
        _instance_at(broken, where)[key] = bad
        assert [tuple(e.absolute_path) for e in errors(broken)] == [where + (key,)], (where, key)
