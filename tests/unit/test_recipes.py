"""Recipe files, --set, and configs as manifest params (no model is built here)."""

import pytest

from gearbox.compression import InvalidArgumentError
from gearbox.compression.recipe_file import apply_settings, load_recipe_file
from gearbox.compression.techniques import (
    ALL_RECIPES,
    PARAMS_SCHEMA_VERSION,
    ComposedConfig,
    DistilledConfig,
    Int8Config,
    PrunedConfig,
    config_from_mapping,
    config_from_params,
    config_to_params,
    override,
    resolve_recipes,
)


def names(recipes):
    return [recipe.name for recipe in recipes]


@pytest.mark.parametrize("config", ALL_RECIPES, ids=lambda c: c.name)
def test_every_recipe_round_trips_through_its_params(config):
    params = config_to_params(config)
    assert params["schema_version"] == PARAMS_SCHEMA_VERSION
    assert params["technique"] == config.technique
    assert config_from_params(params) == config


def test_params_of_another_schema_version_are_refused():
    params = {**config_to_params(PrunedConfig()), "schema_version": 99}
    with pytest.raises(InvalidArgumentError, match="schema version 99"):
        config_from_params(params)


def test_a_composed_recipe_is_named_after_its_steps_and_keeps_model_steps_first():
    recipe = ComposedConfig(steps=(PrunedConfig(), DistilledConfig(), Int8Config()))
    assert recipe.name == "pruned-distilled-int8"
    with pytest.raises(InvalidArgumentError, match="must come before"):
        ComposedConfig(steps=(Int8Config(), PrunedConfig()))
    with pytest.raises(InvalidArgumentError, match="at least two steps"):
        ComposedConfig(steps=(PrunedConfig(),))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"technique": "prune", "amount": 1.5}, "pruning amount must be in"),
        ({"technique": "prune", "amount": "lots"}, "prune.amount"),
        ({"technique": "prune", "amunt": 0.5}, "has no parameter amunt"),
        ({"technique": "shrinkify"}, "unknown technique 'shrinkify'"),
        ({"amount": 0.5}, "needs a 'technique'"),
        ({"technique": "compose", "steps": "pruned"}, "steps must be a list"),
    ],
)
def test_a_bad_config_mapping_gets_one_clear_error(fields, message):
    with pytest.raises(InvalidArgumentError, match=message):
        config_from_mapping(fields)


def test_override_reads_values_as_yaml_and_checks_their_type():
    assert override(DistilledConfig(), "epochs", "20").epochs == 20
    assert override(Int8Config(), "smoothing_alpha", "none").smoothing_alpha is None
    with pytest.raises(InvalidArgumentError, match=r"distill\.epochs"):
        override(DistilledConfig(), "epochs", "many")
    with pytest.raises(InvalidArgumentError, match="has no parameter 'epoch'"):
        override(DistilledConfig(), "epoch", "3")
    with pytest.raises(InvalidArgumentError, match="has no parameter 'name'"):
        override(DistilledConfig(), "name", "other")


def test_override_of_a_composed_recipe_names_the_step():
    recipe = ComposedConfig(steps=(PrunedConfig(), Int8Config()))
    changed = override(recipe, "pruned.amount", "0.7")
    assert changed.steps[0].amount == 0.7 and changed.name == "pruned-int8"
    with pytest.raises(InvalidArgumentError, match="STEP one of pruned, int8"):
        override(recipe, "amount", "0.7")


def test_settings_change_the_named_variant_only_and_bring_in_new_parents():
    recipes = resolve_recipes("int8,distilled")
    changed = apply_settings(recipes, ["distilled.epochs=3", "int8.parent=distilled"])
    by_name = {recipe.name: recipe for recipe in changed}
    assert by_name["distilled"].epochs == 3
    assert names(changed) == ["fp32", "distilled", "int8"]
    with pytest.raises(InvalidArgumentError, match="'pruned' is not being built"):
        apply_settings(recipes, ["pruned.amount=0.3"])
    with pytest.raises(InvalidArgumentError, match=r"is not VARIANT\.PARAM=VALUE"):
        apply_settings(recipes, ["distilled=3"])


def test_a_recipe_file_lists_names_and_full_configs_and_sets_parameters(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "variants:\n"
        "  - distilled\n"
        "  - {name: pruned-70, technique: prune, amount: 0.7}\n"
        "  - technique: compose\n"
        "    steps: [{technique: prune, amount: 0.6}, {technique: quantize}]\n"
        "set:\n"
        "  distilled.epochs: 20\n"
    )
    configs, settings = load_recipe_file(path)
    assert names(configs) == ["distilled", "pruned-70", "pruned-int8"]
    assert settings == ["distilled.epochs=20"]
    recipes = apply_settings(resolve_recipes(None, configs), settings)
    assert names(recipes) == ["fp32", "distilled", "pruned-70", "pruned-int8"]
    assert recipes[1].epochs == 20
    assert recipes[2].amount == 0.7
    assert recipes[3].steps[0].amount == 0.6


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("variants: [", "is not valid YAML"),
        ("variants: []\n", "variants"),
        ("variants: [fp32]\nextra: 1\n", "extra"),
        ("variants: [int16]\n", "unknown variant 'int16'"),
        ("variants: [{technique: prune, amount: 2}]\n", "variant 1: pruning amount"),
    ],
)
def test_a_bad_recipe_file_gets_one_clear_error(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(InvalidArgumentError, match=message):
        load_recipe_file(path)


def test_a_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(InvalidArgumentError, match="cannot read recipe file"):
        load_recipe_file(tmp_path / "nope.yaml")
