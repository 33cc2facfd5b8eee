"""What ``fedsim validate`` accepts for ``federation.protocol: zeroth_order`` must run, and what it refuses it refuses
in one line at the field at fault (issue 13 QA findings 1, 3, 9, 10, 11, 16, 17)."""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import pkgutil
import typing
from typing import Annotated

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.errors import ScenarioError
from fedsim.scenario import parse_scenario
from fedsim.yaml_input import apply_overrides
from fedsim.zo.run import run_zo_scenario

BASE = {
    "name": "zo-edges", "seed": 0,
    "federation": {"protocol": "zeroth_order", "clients": 2, "rounds": 2},
    "backend": {"kind": "inprocess"},
    "zeroth_order": {"task": {"family": "quadratic", "dim": 3}, "method": "fzoos", "local_iters": 2},
}
FZOOS_EDGES = {"n_inits": 1, "gp_points": 2, "gp_restarts": 0, "explore_candidates": 3, "explore_top": 3,
               "rff_features": 100, "rff_points": 1, "refresh_candidates": 4, "refresh_top": 4}


def scenario(*overrides: str, **zo: object) -> dict:
    raw = copy.deepcopy(BASE)
    raw["zeroth_order"].update(zo)
    return apply_overrides(raw, list(overrides))


def refused(raw: dict) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(raw)
    assert "\n" not in str(info.value)
    return info.value


# --------------------------------------------------------------- kind 1: validate accepts what cannot run

@pytest.mark.parametrize(("raw", "path", "words"), [
    (scenario(method="fedzo"), "zeroth_order.rgf.directions", "20 > d (3)"),  # default q = 20
    (scenario(method="scaffold1", rgf={"directions": 4}), "zeroth_order.rgf.directions", "4 > d (3)"),
    (scenario("zeroth_order.task={family: metric, dataset: digits}", method="fedprox", rgf={"directions": 585}),
     "zeroth_order.rgf.directions", "585 > d (584)"),
    (scenario(fzoos={"explore_candidates": 3, "explore_top": 4}), "zeroth_order.fzoos.explore_top", "4 > "),
    (scenario(fzoos={"refresh_candidates": 3, "refresh_top": 4}), "zeroth_order.fzoos.refresh_top", "4 > "),
    (scenario(attacks={"heldout_points": 1}), "zeroth_order.attacks.heldout_points", "equal to 2"),
])
def test_settings_bounded_by_the_task_are_refused_at_their_path(raw: dict, path: str, words: str) -> None:
    err = refused(raw)
    assert err.path == path and words in err.reason


@pytest.mark.parametrize("method", ["fzoos", "fedzo", "fedprox", "scaffold1", "scaffold2"])
def test_every_method_runs_at_the_edge_values_validation_accepts(method: str) -> None:
    """q = d, top = candidates, 2 GP points, 1 RFF point, 2 held-out points: validates, hence must run."""
    zo: dict = {"method": method, "attacks": {"heldout_points": 2, "function_extraction": method == "fzoos"}}
    zo.update({"fzoos": FZOOS_EDGES} if method == "fzoos" else {"rgf": {"directions": 3}})
    for safeguard in ("message", "off"):
        result = run_zo_scenario(parse_scenario(scenario(**zo, safeguard=safeguard)), write=False)
        assert [row["round"] for row in result.history] == [0, 1, 2]
        assert all(math.isfinite(v) for row in result.history for v in row.values() if isinstance(v, float))


# --------------------------------------------------------------- kind 3: YAML 1.1 reads a bare option as a bool

def test_bare_off_means_off_in_a_file_and_in_set() -> None:
    raw = yaml.safe_load("federation: {protocol: zeroth_order}\nzeroth_order: {safeguard: off}\n")
    assert raw["zeroth_order"]["safeguard"] is False  # what YAML 1.1 makes of it
    assert parse_scenario(scenario(safeguard=False)).zeroth_order.safeguard == "off"
    assert parse_scenario(scenario("zeroth_order.safeguard=off")).zeroth_order.safeguard == "off"
    assert refused(scenario(safeguard=True)).path == "zeroth_order.safeguard"  # 'on' means nothing here


def _models() -> list[type[BaseModel]]:
    import fedsim
    import fedsim.attacks as attacks
    import fedsim.defenses as defenses

    found: list[type[BaseModel]] = []
    for pkg in (fedsim, attacks, defenses):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            try:
                module = importlib.import_module(info.name)
            except Exception:  # noqa: BLE001 - an optional dependency; its models are not scenario fields
                continue
            for obj in vars(module).values():
                for cls in [obj, *(vars(obj).values() if inspect.isclass(obj) else [])]:
                    if inspect.isclass(cls) and issubclass(cls, BaseModel) and cls not in found:
                        found.append(cls)
    return found


def _literals(tp: object) -> list[object]:
    if typing.get_origin(tp) is typing.Literal:
        return list(typing.get_args(tp))
    return [v for arg in typing.get_args(tp) for v in _literals(arg)]


def test_every_string_option_yaml_reads_as_another_type_is_accepted_bare() -> None:
    """Project-wide: a Literal option such as 'off' / 'on' / 'yes' / 'null' / '1' must validate from what
    yaml.safe_load makes of it (the shared helper fedsim.yaml_literal.yaml_literal)."""
    checked = []
    for cls in _models():
        for name, field in cls.model_fields.items():
            for option in _literals(field.annotation):
                if isinstance(option, str) and yaml.safe_load(option) != option:
                    adapter = TypeAdapter(Annotated[(field.annotation, *field.metadata)])
                    assert adapter.validate_python(yaml.safe_load(option)) == option, (cls, name, option)
                    checked.append((cls.__name__, name, option))
    assert ("ZerothOrderSpec", "safeguard", "off") in checked


# --------------------------------------------------------------- kind 9: absurd values fail silently

@pytest.mark.parametrize(("override", "path"), [
    ("zeroth_order.defenses.nu_noise=1e300", "zeroth_order.defenses.nu_noise"),
    ("zeroth_order.defenses.y_noise=1e300", "zeroth_order.defenses.y_noise"),
    ("zeroth_order.defenses.ridge=1e300", "zeroth_order.defenses.ridge"),
    ("zeroth_order.task.heterogeneity=1e300", "zeroth_order.task.heterogeneity"),
    ("zeroth_order.task={family: metric, box: 1e308}", "zeroth_order.task.box"),
    ("zeroth_order.task={family: adversarial, dataset: digits, box: 2}", "zeroth_order.task.box"),
    ("zeroth_order.fzoos.explore_radius=5", "zeroth_order.fzoos.explore_radius"),
    ("zeroth_order.fzoos.rff_lengthscale=1e-300", "zeroth_order.fzoos.rff_lengthscale"),
    ("zeroth_order.lr=1e300", "zeroth_order.lr"),
    ("zeroth_order.global_lr=1e300", "zeroth_order.global_lr"),
    ("zeroth_order.fzoos.rff_features=1000000000", "zeroth_order.fzoos.rff_features"),  # a d x M basis: OOM
    ("zeroth_order.task.dim=1000000000", "zeroth_order.task.dim"),
])
def test_values_outside_their_meaningful_range_are_refused(override: str, path: str) -> None:
    assert refused(scenario(override)).path == path


# --------------------------------------------------------------- kind 10: union-typed fields' messages

@pytest.mark.parametrize("gamma", ["abc", float("inf"), -1, True, [1]])
def test_a_bad_gamma_is_one_line_at_its_field_naming_both_forms(gamma: object) -> None:
    err = refused(scenario(fzoos={"gamma": gamma}))
    assert err.path == "zeroth_order.fzoos.gamma"
    assert "'decay'" in err.reason and "finite number >= 0" in err.reason


def test_a_union_error_names_the_field_not_pydantics_member_tag() -> None:
    """Any union field (here an attack's ``clients: list[int] | 'all'``): the path ends at the field."""
    raw = {"name": "x", "attacks": [{"name": "dlg", "clients": "abc"}]}
    err = refused(raw)
    assert err.path == "attacks[0].clients"
    assert "'all'" in err.reason and "list" in err.reason


# --------------------------------------------------------------- kind 11: the path of a cross-field error

@pytest.mark.parametrize("family", ["metric", "adversarial"])
def test_too_many_clients_for_the_class_split_is_reported_at_federation_clients(family: str) -> None:
    raw = scenario(f"zeroth_order.task={{family: {family}, dataset: digits}}", "federation.clients=11")
    err = refused(raw)
    assert err.path == "federation.clients" and "11 clients" in err.reason


# --------------------------------------------------------------- kind 16: round 0 carries only what is needed

def test_without_the_safeguard_round_0_sends_no_value() -> None:
    zo = {"fzoos": FZOOS_EDGES | {"n_inits": 5}, "safeguard": "off"}
    result = run_zo_scenario(parse_scenario(scenario(**zo)), write=False)
    row0 = result.history[0]
    assert row0["zo_uplink_floats"] == 0  # no f_i(x0) reply
    assert row0["zo_queries_round"] == 2 * 5  # the initial queries only: N * n_inits
    on = run_zo_scenario(parse_scenario(scenario(**zo | {"safeguard": "message"})), write=False).history[0]
    assert on["zo_uplink_floats"] == 2 and on["zo_queries_round"] == 2 * (5 + 1)  # + f_i(x0) per client


# --------------------------------------------------------------- kind 17: fedsim list shows the protocol

def test_fedsim_list_shows_the_zeroth_order_choices_and_dataset_descriptions() -> None:
    out = CliRunner().invoke(app, ["list"], env={"COLUMNS": "250"}).output
    for kind, name in [("zo task", "quadratic"), ("zo task", "adversarial"), ("zo method", "scaffold2"),
                       ("zo defense", "nu_noise"), ("zo attack", "label_set")]:
        assert any(kind in line and f" {name} " in line for line in out.splitlines()), (kind, name)
    digits = next(line for line in out.splitlines() if " digits " in line)
    assert "image classification" in digits and "zeroth-order" in digits


# --------------------------------------------------------------- QA2 kind 1: YAML 1.1 reads 1e-3 as a string

def _float_fields() -> list[tuple[type[BaseModel], str]]:
    """Every field of the zeroth_order block whose type admits a float (plain or in a union)."""
    from fedsim.zo import spec as zo_spec

    out = []
    for model in (zo_spec.ZOTask, zo_spec.FZooSSettings, zo_spec.RGFSettings, zo_spec.MessageDefenses,
                  zo_spec.ZOAttacks, zo_spec.ZerothOrderSpec):
        for name, field in model.model_fields.items():
            if "float" in str(field.annotation) or field.annotation is float:
                out.append((model, name))
    return out


@pytest.mark.parametrize(("model", "name"), _float_fields(), ids=lambda v: getattr(v, "__name__", v))
def test_every_float_field_takes_the_string_yaml_makes_of_1e_3(model: type[BaseModel], name: str) -> None:
    read = yaml.safe_load(f"{name}: 1e-3")  # YAML 1.1: no dot -> the string '1e-3'
    assert read[name] == "1e-3"
    assert float(getattr(model.model_validate(read), name)) == 1e-3


def test_gamma_1e_3_from_a_yaml_file_or_set_validates() -> None:
    parse_scenario(scenario("zeroth_order.fzoos.gamma=1e-3"))
    raw = copy.deepcopy(BASE)
    raw["zeroth_order"]["fzoos"] = yaml.safe_load("{gamma: 1e-3}")
    assert parse_scenario(raw).zeroth_order.fzoos.gamma == 1e-3


# --------------------------------------------------------------- QA2 kind 2: bounds on products, not only fields

@pytest.mark.parametrize(("overrides", "path", "other"), [
    (("zeroth_order.task.dim=100000", "zeroth_order.fzoos.rff_features=100000"), "zeroth_order.fzoos.rff_features",
     "d (100000)"),
    (("zeroth_order.fzoos.rff_features=100000", "zeroth_order.fzoos.rff_points=100000"),
     "zeroth_order.fzoos.rff_points", "rff_features (100000)"),
    (("zeroth_order.task.dim=100000", "zeroth_order.fzoos.rff_features=10",
      "zeroth_order.attacks.heldout_points=100000"),
     "zeroth_order.attacks.heldout_points", "d (100000)"),
    (("zeroth_order.fzoos.gp_points=100000",), "zeroth_order.fzoos.gp_points", "gp_points^2"),
    (("zeroth_order.task.dim=100000", "zeroth_order.method=fedzo", "zeroth_order.rgf.directions=100000"),
     "zeroth_order.rgf.directions", "d (100000)"),
])
def test_an_array_over_2_gib_is_refused_at_the_field_that_made_it(overrides: tuple[str, ...], path: str,
                                                                   other: str) -> None:
    raw = scenario(*overrides)
    if "zeroth_order.method=fedzo" in overrides:
        raw["zeroth_order"].pop("fzoos", None)
    err = refused(raw)
    elements = 10**10  # 1e5 x 1e5 float64 = 74.5 GiB, whatever the pair
    assert err.path == path
    assert other in err.reason and "2 GiB per array" in err.reason and f"{elements * 8 / 2**30:.1f} GiB" in err.reason


def test_a_memory_error_in_a_client_names_the_fields_that_size_the_arrays() -> None:
    from fedsim.simulation.participation import one_line
    from fedsim.zo.server_app import _reason

    line = _reason(one_line("MemoryError: \nTraceback ..."))
    assert "zeroth_order.fzoos.rff_features" in line and "zeroth_order.task.dim" in line and "\n" not in line


# --------------------------------------------------------------- QA2 kind 10: bool / number confusion

def _typed_fields(kind: type) -> list[tuple[type[BaseModel], str]]:
    from fedsim.zo import spec as zo_spec

    out = []
    for model in (zo_spec.ZOTask, zo_spec.FZooSSettings, zo_spec.RGFSettings, zo_spec.MessageDefenses,
                  zo_spec.ZOAttacks, zo_spec.ZerothOrderSpec):
        for name, field in model.model_fields.items():
            ann = str(field.annotation)
            if field.annotation is kind or (kind is not bool and kind.__name__ in ann and "Literal" not in ann):
                out.append((model, name))
    return out


@pytest.mark.parametrize(("model", "name"), _typed_fields(int) + _typed_fields(float),
                         ids=lambda v: getattr(v, "__name__", v))
@pytest.mark.parametrize("flag", [True, False])
def test_a_number_field_refuses_a_boolean_saying_yaml_read_it_so(model: type[BaseModel], name: str,
                                                                 flag: bool) -> None:
    with pytest.raises(Exception) as info:  # noqa: PT011 - pydantic's ValidationError or the path error
        model.model_validate({name: flag})
    assert "YAML reads a bare on/off" in str(info.value), (model.__name__, name)


@pytest.mark.parametrize(("model", "name"), _typed_fields(bool), ids=lambda v: getattr(v, "__name__", v))
@pytest.mark.parametrize("number", [0, 1])
def test_a_true_false_field_refuses_a_number(model: type[BaseModel], name: str, number: int) -> None:
    with pytest.raises(Exception) as info:  # noqa: PT011
        model.model_validate({name: number})
    assert "give true or false" in str(info.value)


def test_bool_number_confusion_is_one_line_at_its_path() -> None:
    assert refused(scenario("zeroth_order.task.box=off")).path == "zeroth_order.task.box"
    assert refused(scenario("zeroth_order.defenses.secagg=1")).path == "zeroth_order.defenses.secagg"
    err = refused(scenario("zeroth_order.method=fedzo", "zeroth_order.rgf.directions=true"))
    assert err.path == "zeroth_order.rgf.directions" and "boolean true" in err.reason
