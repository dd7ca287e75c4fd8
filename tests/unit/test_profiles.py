"""Hardware profiles: presets load, widths resolve, flags only narrow, bad YAML fails readably."""

from __future__ import annotations

import copy
import math
import pickle
import textwrap
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

import cgmq_cli
from cgmq_cli.errors import EXIT_BAD_INPUT, ProfileError
from cgmq_cli.profiles import (
    Budgets,
    HardwareProfile,
    OpWidths,
    Override,
    list_presets,
    load_profile,
    parse_profile,
    preset_names,
    presets_dir,
)

REPO = Path(__file__).resolve().parents[2]
PRESETS = ("generic", "lowbit-accel", "int8-cpu", "npu-4-8", "mcu-8bit")

GOOD = """\
schema_version: 1
name: custom
weight_bits: [2, 4, 8]
act_bits: [4, 8]
per_op:
  depthwise: {weight_bits: [8]}
overrides:
  - {match: first, act_bits: [8]}
  - {match: "features.*", weight_bits: [4, 8]}
  - {match: last, weight_bits: [8], act_bits: [8]}
budgets: {rel_bops: 12.5}
"""


def write(tmp_path: Path, text: str, name: str = "profile.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def load_text(tmp_path: Path, text: str) -> HardwareProfile:
    return load_profile(write(tmp_path, text))


# --- presets ----------------------------------------------------------------------------------


def test_presets_dir_is_the_top_level_folder_in_a_checkout_else_package_data():
    package = Path(cgmq_cli.__file__).resolve().parent
    assert presets_dir() == (REPO / "presets" if package.parent == REPO else package / "presets")
    assert set(PRESETS) <= set(preset_names())


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_documents_its_hardware(name):
    profile = load_profile(name)
    assert profile.name == name
    assert profile.source == f"preset:{name}"
    assert profile.description
    first_line = (presets_dir() / f"{name}.yaml").read_text().splitlines()[0]
    assert first_line.startswith(f"# {name}:")


def test_list_presets_matches_the_files_and_default_is_generic():
    assert [p.name for p in list_presets()] == preset_names()
    generic = load_profile(None)
    assert generic.name == "generic"
    assert generic.weight_bits == generic.act_bits == (2, 4, 8, 16, 32)
    assert generic.cost_table is None and generic.input_bits == 8


def test_preset_contents():
    assert load_profile("int8-cpu").weight_bits == (8, 32)
    int8 = load_profile("int8-cpu")
    assert int8.act_signedness == "asymmetric" and int8.reduce_range
    assert int8.integer_ops == ("conv", "linear", "matmul", "add", "concat", "pooling") and int8.integer_width == 8
    assert load_profile("generic").integer_ops == () and not load_profile("generic").reduce_range
    assert load_profile("lowbit-accel").act_bits == (2, 4, 8)
    mcu = load_profile("mcu-8bit")
    assert (mcu.weight_bits, mcu.act_bits, mcu.default_budgets.weight_bytes) == ((2, 4, 8), (8,), 65536.0)
    npu = load_profile("npu-4-8")
    assert npu.mac_cost(4, 4) == 0.25 and npu.mac_cost(8, 4) == 0.5 and npu.mac_cost(8, 8) == 1.0
    assert npu.cost_unit == "cycles"


def test_unknown_preset_lists_presets_and_guesses():
    with pytest.raises(ProfileError) as info:
        load_profile("int8cpu")
    message = info.value.message
    assert "`int8cpu`" in message and "did you mean `int8-cpu`" in message
    assert all(name in message for name in PRESETS)
    assert info.value.exit_code == EXIT_BAD_INPUT


def test_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ProfileError, match="nope.yaml: profile file not found"):
        load_profile(missing)


# --- widths_for -------------------------------------------------------------------------------


def test_widths_for_applies_defaults_per_op_and_overrides_in_order(tmp_path):
    profile = load_text(tmp_path, GOOD)
    n = 4
    assert profile.widths_for("conv1", "conv", 0, n) == ((2, 4, 8), (8,))  # first
    assert profile.widths_for("block.conv", "conv", 1, n) == ((2, 4, 8), (4, 8))  # defaults
    assert profile.widths_for("block.dw", "depthwise", 1, n) == ((8,), (4, 8))  # per_op
    assert profile.widths_for("features.3", "conv", 2, n) == ((4, 8), (4, 8))  # glob
    assert profile.widths_for("features.dw", "depthwise", 2, n) == ((4, 8), (4, 8))  # glob wins over per_op
    assert profile.widths_for("fc", "linear", 3, n) == ((8,), (8,))  # last
    assert profile.widths_for("features.9", "linear", 3, n) == ((8,), (8,))  # later override wins


def test_widths_for_single_layer_is_first_and_last(tmp_path):
    assert load_text(tmp_path, GOOD).widths_for("only", "linear", 0, 1) == ((8,), (8,))


def test_widths_for_accepts_the_graph_passes_name_and_refuses_unknown_kinds(tmp_path):
    profile = load_text(tmp_path, GOOD)
    assert profile.widths_for("x", "conv2d", 1, 4) == profile.widths_for("x", "conv", 1, 4)
    with pytest.raises(ProfileError, match="'conv3d'"):
        profile.widths_for("x", "conv3d", 1, 4)


def test_glob_match_is_case_sensitive():
    profile = HardwareProfile(name="t", overrides=(Override("Features.*", weight_bits=[8]),))
    assert profile.widths_for("features.0", "conv", 1, 3)[0] == (2, 4, 8, 16, 32)
    assert profile.widths_for("Features.0", "conv", 1, 3)[0] == (8,)


# --- narrowed ---------------------------------------------------------------------------------


def test_narrowed_intersects_every_set(tmp_path):
    profile = load_text(tmp_path, GOOD).narrowed(weight_bits=[4, 8], act_bits=[8])
    assert (profile.weight_bits, profile.act_bits) == ((4, 8), (8,))
    assert profile.per_op["depthwise"].weight_bits == (8,)
    assert profile.widths_for("block.conv", "conv", 1, 4) == ((4, 8), (8,))
    assert profile.widths_for("fc", "linear", 3, 4) == ((8,), (8,))
    assert load_text(tmp_path, GOOD).narrowed(None, None) == load_text(tmp_path, GOOD)


def test_narrowed_refuses_a_width_the_profile_never_allows():
    with pytest.raises(ProfileError) as info:
        load_profile("int8-cpu").narrowed(weight_bits=[4, 8])
    message = info.value.message
    assert "--weight-bits 4" in message and "int8-cpu" in message and "8, 32" in message


def test_narrowed_refuses_an_empty_intersection(tmp_path):
    with pytest.raises(ProfileError) as info:
        load_text(tmp_path, GOOD).narrowed(weight_bits=[2])
    message = info.value.message
    assert "--weight-bits 2" in message and "depthwise" in message
    with pytest.raises(ProfileError, match="--act-bits 4 leaves no width for layers matching `first`"):
        load_text(tmp_path, GOOD).narrowed(act_bits=[4])


@pytest.mark.parametrize("bad", [[3], [], "8"])
def test_narrowed_refuses_invalid_flag_values(bad):
    with pytest.raises(ProfileError, match="--act-bits"):
        load_profile("generic").narrowed(act_bits=bad)


# --- mac_cost ---------------------------------------------------------------------------------


def test_mac_cost_without_table_is_bit_operations():
    profile = load_profile("generic")
    assert profile.mac_cost(4, 8) == 32.0
    assert profile.mac_cost(32, 32) == 1024.0


def test_mac_cost_with_table_and_missing_pair():
    profile = HardwareProfile(name="t", weight_bits=(4, 8), act_bits=(8,), cost_table={(4, 8): 0.5, (8, 8): 1.0})
    assert profile.mac_cost(4, 8) == 0.5
    with pytest.raises(ProfileError, match="no entry 2x8"):
        profile.mac_cost(2, 8)


def test_table_need_only_cover_reachable_pairs(tmp_path):
    profile = load_text(tmp_path, """\
        schema_version: 1
        weight_bits: [4]
        act_bits: [4]
        overrides: [{match: last, weight_bits: [8], act_bits: [8]}]
        cost: {metric: table, unit: nJ, table: {"4x4": 1, "8x8": 3}}
    """)
    assert profile.mac_cost(8, 8) == 3.0 and profile.name == "profile"


# --- construction from Python -----------------------------------------------------------------


def test_profiles_pickle_and_deepcopy():
    npu = load_profile("npu-4-8")
    assert pickle.loads(pickle.dumps(npu)) == npu
    assert copy.deepcopy(npu).per_op["depthwise"].weight_bits == (8,)


def test_construction_sorts_and_freezes():
    profile = HardwareProfile(name="t", weight_bits=[8, 2], per_op={"linear": OpWidths(act_bits=[16, 8])})
    assert profile.weight_bits == (2, 8) and profile.per_op["linear"].act_bits == (8, 16)
    with pytest.raises(TypeError):
        profile.per_op["conv"] = OpWidths(weight_bits=[8])  # type: ignore[index]


@pytest.mark.parametrize("make, needle", [
    (lambda: Budgets(bops=-1), "bops = -1"),
    (lambda: Budgets(rel_bops=150), "rel_bops = 150"),
    (lambda: OpWidths(), "sets neither"),
    (lambda: Override("", weight_bits=[8]), "match = ''"),
    (lambda: HardwareProfile(name="t", input_bits=7), "input_bits = 7"),
    (lambda: HardwareProfile(name="t", per_op={"conv": {"weight_bits": [8]}}), "per_op.conv"),
])
def test_direct_construction_validates(make, needle):
    from cgmq_cli.budget import BudgetValueError  # budgets are shared with flags and the cost model

    with pytest.raises((ProfileError, BudgetValueError), match=needle.replace("(", r"\(")):
        make()


# --- bad YAML: one readable line naming the file, the key path and the value --------------------

BAD = {
    "syntax": ("schema_version: 1\nweight_bits: [8, 4\nact_bits: [8]\n", ["invalid YAML at line"]),
    "duplicate key": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\nact_bits: [4]\n",
                      ["duplicate key 'act_bits'", "line 4"]),
    "not a mapping": ("- 8\n- 4\n", ["<document>", "[8, 4]"]),
    "unknown top key": ("schema_version: 1\nweight_bitz: [8]\nact_bits: [8]\n",
                        ["unknown key `weight_bitz`", "did you mean `weight_bits`"]),
    "unknown nested key": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\nper_op: {conv: {weight_bit: [8]}}\n",
                           ["unknown key `per_op.conv.weight_bit`", "did you mean `weight_bits`"]),
    "unknown op kind": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\nper_op: {convv: {weight_bits: [8]}}\n",
                        ["per_op.convv", "did you mean `conv`"]),
    "width 3": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\nper_op: {conv: {weight_bits: [4, 3]}}\n",
                ["per_op.conv.weight_bits[1] = 3", "2, 4, 8, 16, 32"]),
    "width as float": ("schema_version: 1\nweight_bits: [8.0]\nact_bits: [8]\n", ["weight_bits[0] = 8.0"]),
    "width not a list": ("schema_version: 1\nweight_bits: 8\nact_bits: [8]\n", ["weight_bits = 8", "list"]),
    "empty bits": ("schema_version: 1\nweight_bits: [8]\nact_bits: []\n", ["act_bits = []", "empty"]),
    "duplicate width": ("schema_version: 1\nweight_bits: [8, 8]\nact_bits: [8]\n", ["weight_bits = [8, 8]"]),
    "missing schema": ("weight_bits: [8]\nact_bits: [8]\n", ["missing key `schema_version`"]),
    "schema 99": ("schema_version: 99\nweight_bits: [8]\nact_bits: [8]\n", ["schema_version = 99", "1"]),
    "missing act_bits": ("schema_version: 1\nweight_bits: [8]\n", ["missing key `act_bits`"]),
    "negative budget": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\nbudgets: {bops: -5}\n",
                        ["budgets.bops = -5", "positive"]),
    "zero budget": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\nbudgets: {weight_bytes: 0}\n",
                    ["budgets.weight_bytes = 0"]),
    "nan budget": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\nbudgets: {rel_bops: .nan}\n",
                   ["budgets.rel_bops = nan"]),
    "inf budget": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\nbudgets: {cost: .inf}\n",
                   ["budgets.cost = inf"]),
    "text budget": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\nbudgets: {bops: lots}\n",
                    ["budgets.bops = 'lots'"]),
    "unknown budget": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\nbudgets: {bop: 5}\n",
                       ["budgets.bop", "did you mean `bops`"]),
    "bad granularity": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\nweight_granularity: per-chanel\n",
                        ["weight_granularity = 'per-chanel'", "did you mean `per-channel`"]),
    "bad signedness": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\nact_signedness: yes\n",
                       ["act_signedness = True", "auto, unsigned, signed"]),
    "bad input bits": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\ninput_bits: 12\n", ["input_bits = 12"]),
    "override no match": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\noverrides: [{weight_bits: [8]}]\n",
                          ["overrides[0].match = None"]),
    "override bad match": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\n"
                           "overrides: [{match: LAST, weight_bits: [8]}]\n", ["overrides[0].match = 'LAST'", "last"]),
    "override sets nothing": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\noverrides: [{match: last}]\n",
                              ["overrides[0]", "sets neither"]),
    "override width": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\n"
                       "overrides: [{match: first, act_bits: [6]}]\n", ["overrides[0].act_bits[0] = 6"]),
    "table missing pair": ("schema_version: 1\nweight_bits: [4, 8]\nact_bits: [8]\n"
                           "cost: {metric: table, unit: cycles, table: {'8x8': 1.0}}\n",
                           ["cost.table = '4x8'", "missing"]),
    "table negative": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\n"
                       "cost: {metric: table, unit: cycles, table: {'8x8': -1}}\n", ["cost.table.8x8 = -1"]),
    "table bad key": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\n"
                      "cost: {metric: table, unit: cycles, table: {'8*8': 1}}\n", ["cost.table.8*8 = '8*8'"]),
    "table rewards width": ("schema_version: 1\nweight_bits: [4, 8]\nact_bits: [8]\n"
                            "cost: {metric: table, unit: cycles, table: {'4x8': 2, '8x8': 1}}\n",
                            ["cost.table.4x8 = 2.0", "8x8"]),
    "table without unit": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\n"
                           "cost: {metric: table, table: {'8x8': 1}}\n", ["cost.unit = None"]),
    "bad metric": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\ncost: {metric: bips}\n",
                   ["cost.metric = 'bips'", "did you mean `bops`"]),
    "table with bops": ("schema_version: 1\nweight_bits: [8]\nact_bits: [8]\ncost: {table: {'8x8': 1}}\n",
                        ["cost.table", "metric: table"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_yaml_gives_one_readable_line(tmp_path, case):
    text, needles = BAD[case]
    path = write(tmp_path, text, "bad-profile.yaml")
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = info.value.message
    full = f"{message} {info.value.hint or ''}"
    assert message.startswith(path), message
    assert "\n" not in message
    for needle in needles:
        assert needle in full, (needle, full)


def test_parse_profile_takes_loaded_data_and_names_the_source():
    data = {"schema_version": 1, "weight_bits": [8], "act_bits": [8], "budgets": {"bops": float("nan")}}
    with pytest.raises(ProfileError, match=r"^inline: budgets\.bops = nan"):
        parse_profile(data, "inline")
    data["budgets"] = {"bops": "1e8"}  # YAML 1.1 reads 1e8 as a string
    assert parse_profile(data, "inline").default_budgets.bops == 1e8


def test_good_yaml_round_trips_every_field(tmp_path):
    profile = load_text(tmp_path, GOOD)
    assert profile.name == "custom" and profile.schema_version == 1
    assert profile.overrides[1] == Override("features.*", weight_bits=(4, 8))
    assert profile.default_budgets == Budgets(rel_bops=12.5)
    assert math.isclose(profile.default_budgets.rel_bops, 12.5)
    assert (profile.weight_granularity, profile.act_signedness, profile.cost_unit) == ("per-channel", "auto", "BOPs")


# --- packaging ------------------------------------------------------------------------------------


def test_pyproject_ships_presets_and_lists_every_subpackage():
    """The wheel maps presets/ to cgmq_cli/presets; an explicit package list must not miss a subpackage."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["cgmq_cli.presets"] == "presets"
    assert setuptools["package-data"]["cgmq_cli.presets"] == ["*.yaml"]
    found = set(find_packages(str(REPO), include=["cgmq_cli*"]))
    assert found | {"cgmq_cli.presets"} == set(setuptools["packages"])
