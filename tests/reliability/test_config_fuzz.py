"""Config fuzzing: every key of config/schema.yaml (found by walking the schema, so a new key is covered
without editing this file) given a value of the wrong type and a value out of range. The workflow's own
validate_config() (taken from rules/common.smk and run in this process) must refuse each with one line naming the
key; a few go through the real `snakemake -n`, which must stop before any job."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess

import jsonschema
import pytest
import snakemake.utils
import yaml
from reliability_support import GUARANTEE, REFUSAL, ROOT, cases, python_env
from snakemake.exceptions import WorkflowError

pytestmark = pytest.mark.reliability

SCHEMA = yaml.safe_load((ROOT / "config" / "schema.yaml").read_text())
COMMON = (ROOT / "rules" / "common.smk").read_text()
SNAKEMAKE = shutil.which("snakemake")
# a data set of each source, so every branch of the data set schema has a place in the config
DATASET_OF = {"simulate": "sim-sc", "download": "web", "file": "local"}


def base_config() -> dict:
    """config/test.yaml plus a downloaded and a local data set: valid, with every section present."""
    config = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    config["datasets"]["web"] = {"download": {"url": "https://example.org/counts.h5", "sha256": "0" * 64}}
    config["datasets"]["local"] = {"file": {"path": "data/counts.h5ad", "labels": "cell_type"}}
    return config


def workflow_validator():
    """rules/common.smk's validate_config and config_error, run here with the schema at its real path."""
    source = "\n\n".join(re.search(rf"^def {name}\(.*?(?=^\S)", COMMON, re.S | re.M).group(0)
                         for name in ("config_error", "validate_config"))
    schema_file = str(ROOT / "config" / "schema.yaml")
    namespace = {"jsonschema": jsonschema, "WorkflowError": WorkflowError,
                 "validate": lambda config, schema=None: snakemake.utils.validate(config, schema_file)}
    exec(compile(source, "<validate_config from rules/common.smk>", "exec"), namespace)

    def run(config: dict) -> None:
        namespace["config"] = config
        namespace["validate_config"]()

    return run


VALIDATE = workflow_validator()


# ---- walking the schema --------------------------------------------------------------------------

def resolve(node: dict) -> dict:
    if "$ref" in node:
        target = SCHEMA
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return {**resolve(target), **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def keys(node: dict, path: tuple = ()) -> list[tuple[tuple, dict]]:
    """(config path, schema) of every key the schema defines, depth first; data sets by an example name."""
    found = []
    node = resolve(node)
    for name, sub in node.get("properties", {}).items():
        sub = resolve(sub)
        where = path + (name,)
        found.append((where, sub))
        found += keys(sub, where)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):  # data sets: one example of each source
        dataset = resolve(extra)
        for source, name in DATASET_OF.items():
            found += [(w, s) for w, s in keys(dataset, path + (name,)) if w[len(path) + 1] in (source, "components")]
        found = list({w: (w, s) for w, s in found}.values())
    return found


def types_of(schema: dict) -> set[str]:
    given = schema.get("type", [])
    return {given} if isinstance(given, str) else set(given)


def wrong_type(schema: dict):
    """A value of a JSON type the key does not accept."""
    accepted = types_of(schema)
    if "enum" in schema and not accepted:
        return 12345
    for value, jtype in (("seven", "string"), ({"seven": 7}, "object"), (7, "integer"), ([7], "array")):
        if jtype not in accepted and not (jtype == "integer" and "number" in accepted):
            return value
    raise AssertionError(f"no wrong type for {schema}")


def valid_item(path: tuple, config: dict):
    node = config
    for part in path:
        node = node[part]
    return node[0]


def out_of_range(schema: dict, path: tuple, config: dict) -> list:
    """Values of an accepted type that break the key's other rules (bounds, pattern, choices, sizes)."""
    bad = []
    for rule, make in (("minimum", lambda v: v - 1), ("exclusiveMinimum", lambda v: v),
                       ("maximum", lambda v: v + 1), ("exclusiveMaximum", lambda v: v)):
        if rule in schema:
            bad.append(make(schema[rule]))
    if "enum" in schema:
        bad.append("no-such-choice")
    if "pattern" in schema:
        bad += ["../evil", "a/b"] if path[-1] == "dataset" or "name" in path[-1:] else ["../evil"]
    if schema.get("minLength"):
        bad.append("")
    if "array" in types_of(schema):
        if schema.get("minItems"):
            bad.append([])
        items = resolve(schema.get("items", {}))
        item_bad = out_of_range(items, path + ("0",), config) if items else []
        if item_bad:
            bad.append([item_bad[0]])
        if "maxItems" in schema:
            bad.append([valid_item(path, config)] * (schema["maxItems"] + 1))
        if schema.get("uniqueItems"):
            bad.append([valid_item(path, config)] * 2)
    return bad


def place(config: dict, path: tuple, value) -> dict:
    config = copy.deepcopy(config)
    node = config
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return config


def refusal(config: dict) -> str:
    """The one-line message the workflow stops with; fails if the config is accepted or the error is another."""
    with pytest.raises(WorkflowError) as caught:
        VALIDATE(config)
    message = str(caught.value)
    assert message.startswith("config: ") and "\n" not in message, message
    return message


def present(path: tuple, config: dict) -> bool:
    node = config
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


CASES = []
for path, schema in keys(SCHEMA):
    CASES.append((path, "wrong type", wrong_type(schema)))
    if "array" not in types_of(schema) or present(path, base_config()):
        CASES += [(path, "out of range", value) for value in out_of_range(schema, path, base_config())]


# ---- the cases -----------------------------------------------------------------------------------

@GUARANTEE
def test_the_base_config_and_documented_nulls_are_accepted():
    """The starting point is valid (else every refusal below would prove nothing), and so is each 'null = skip'."""
    VALIDATE(base_config())
    for figure in ("figure2", "figure3", "figure5"):
        config = base_config()
        config["figures"][figure] = None
        VALIDATE(config)
    cases(4)


@REFUSAL
def test_every_key_with_a_wrong_type_or_out_of_range_value_is_refused_naming_it():
    walked = {path for path, _ in keys(SCHEMA)}
    assert {("training", "epochs"), ("datasets", "sim-sc", "simulate", "n_cells"),
            ("datasets", "web", "download", "url"), ("figures", "figure5", "likelihood"),
            ("gridsearch", "resources", "gpu")} <= walked
    refused = []
    for path, what, value in CASES:
        message = refusal(place(base_config(), path, value))
        key = message.removeprefix("config: ").split(": ", 1)[0]
        dotted = ".".join(path)
        assert key == dotted or key.startswith(dotted + "."), (what, value, message)
        refused.append((dotted, what))
    wrong = {k for k, what in refused if what == "wrong type"}
    assert len(wrong) == len(walked), sorted(set(map(".".join, walked)) - wrong)
    cases(len(refused))


@REFUSAL
@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "x y", "$(touch pwned)", "a;b", ""])
def test_unsafe_dataset_names_are_refused_so_no_output_lands_outside_results(name):
    config = base_config()
    config["datasets"][name] = {"simulate": {"kind": "poisson-check"}}
    message = refusal(config)
    assert message.startswith("config: datasets: ") and repr(name) in message, message
    assert refusal(place(base_config(), ("gridsearch", "datasets"), [name])).startswith(
        "config: gridsearch.datasets.0: ")
    assert refusal(place(base_config(), ("figures", "figure3", "dataset"), name)).startswith(
        "config: figures.figure3.dataset: ")


@REFUSAL
def test_every_object_refuses_an_unknown_key_naming_where():
    objects = [path for path, schema in keys(SCHEMA) if schema.get("additionalProperties") is False]
    for path in objects:
        config = base_config()
        node = config
        for part in path:
            node = node.setdefault(part, {})
        node["lerning_rate"] = 1
        message = refusal(config)
        assert message.startswith(f"config: {'.'.join(path)}: ") and "lerning_rate" in message, message
    assert len(objects) >= 14
    cases(len(objects))


@REFUSAL
def test_wildcard_constraints_keep_data_set_names_inside_results():
    """The rules' own wildcard pattern for data sets refuses '..' and '/', whatever reaches it."""
    pattern = re.search(r'dataset=r"([^"]+)"', COMMON).group(1)
    for name in ("../evil", "a/b", "..", "/abs"):
        assert re.fullmatch(pattern, name) is None, name
    assert re.fullmatch(pattern, "sim-sc_2")



# ---- through the real snakemake command ----------------------------------------------------------

REAL_CLI = [
    (("training", "epochs"), "many", "config: training.epochs: 'many' is not of type 'integer'"),
    (("gridsearch", "latents"), [0], "config: gridsearch.latents.0: 0 is less than the minimum of 1"),
    (("datasets", "../evil"), {"simulate": {"kind": "poisson-check"}}, "config: datasets: '../evil' does not match"),
    (("split", "fractions"), [0.5, 0.5, 0.5], "config: split.fractions: must sum to 1"),
    (("figures", "figure5", "dataset"), "nowhere", "config: figures.figure5.dataset: no data set named 'nowhere'"),
]


@REFUSAL
@pytest.mark.skipif(SNAKEMAKE is None, reason="the snakemake command is not on PATH")
def test_snakemake_refuses_before_any_job_naming_the_key(tmp_path):
    work = tmp_path / "workflow"
    work.mkdir()
    for name in ("Snakefile", "rules", "workflow_scripts", "config", "envs", "report"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, work / name)
    for i, (path, value, expected) in enumerate(REAL_CLI):
        (work / "config" / f"bad{i}.yaml").write_text(yaml.safe_dump(place(base_config(), path, value)))
        proc = subprocess.run([SNAKEMAKE, "-n", "--cores", "1", "--configfile", f"config/bad{i}.yaml"], cwd=work,
                              env=python_env(), capture_output=True, text=True, timeout=900)  # a hang guard
        output = proc.stdout + proc.stderr  # Snakemake prints a config error on stdout in a dry run
        assert proc.returncode != 0
        assert expected in output, output[-2000:]
        assert "Job stats" not in output and "Traceback" not in output
    assert not (work / "results").exists() and not (work / "resources").exists()
    cases(len(REAL_CLI))
