"""Recipes: files round-trip (YAML and TOML), build the pruner they describe, match Pruner's defaults, and
every bad key or value is a ValueError naming it and what is allowed."""
import inspect
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from torch import nn

from prune import Constant, CubicRamp, Distiller, ExponentialRamp, LinearRamp, Pruner
from prune.criteria import Criterion
from prune.one_shot.config import OneShotConfig
from prune.recipe import Recipe, load_recipe, module_types

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "recipes"


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32)))
    model.add_module("classifier", nn.Linear(32, 4))
    return model


RECIPES = {
    "movement": Recipe(CubicRamp(0.0, 0.9, begin_step=10, end_step=100, every=10), criterion="movement",
                       exclude=("classifier",)),
    "global": Recipe(LinearRamp(0.1, 0.8, begin_step=0, end_step=50, every=5), scope="global",
                     max_layer_sparsity=0.95, include=("encoder",)),
    "two_four": Recipe(Constant(0.5), pattern="2:4", types=("Linear",)),
    "row": Recipe(ExponentialRamp(0.0, 0.75, begin_step=0, end_step=8, every=2), scope="row",
                  exclude=("encoder.0", "classifier")),
    "distill": Recipe(CubicRamp(0.0, 0.8, begin_step=0, end_step=20, every=5), criterion="taylor",
                      distill={"temperature": 4, "hidden": {"encoder.2": "encoder.0"}, "hidden_loss": "cosine",
                               "task_weight": 0.5}),
}


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".toml"])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_recipe_round_trips_through_its_file_and_the_pruner(tmp_path, name, suffix):
    recipe = RECIPES[name]
    recipe.save(tmp_path / f"run{suffix}")
    assert load_recipe(tmp_path / f"run{suffix}") == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    model = mlp()
    distiller = Distiller.from_recipe(model, tmp_path / f"run{suffix}") if recipe.distill else None
    pruner = Pruner.from_recipe(model, tmp_path / f"run{suffix}")
    assert pruner.to_recipe(distiller) == recipe


def test_the_distill_table_holds_every_distiller_setting_and_builds_it():
    recipe = RECIPES["distill"]
    assert recipe.distill == {"temperature": 4.0, "logits_weight": 1.0, "hidden": {"encoder.2": "encoder.0"},
                              "hidden_loss": "cosine", "hidden_weight": 1.0, "task_weight": 0.5}
    defaults = {k: p.default for k, p in inspect.signature(Distiller).parameters.items()
                if k not in ("student", "teacher", "task_loss")}
    assert Recipe(Constant(0.5), distill={}).distill == {**defaults, "hidden": {}}
    distiller = Distiller.from_recipe(mlp(), recipe)
    assert distiller.temperature == 4.0 and distiller.weights == {"task": 0.5, "logits": 1.0, "hidden": 1.0}
    assert distiller.pairs == {"encoder.2": "encoder.0"} and distiller.hidden_loss == "cosine"
    with pytest.raises(ValueError, match="the recipe has no 'distill' settings"):
        Distiller.from_recipe(mlp(), RECIPES["row"])


def test_a_pruner_built_by_hand_writes_the_recipe_that_rebuilds_it(tmp_path):
    settings = dict(sparsity=LinearRamp(0.0, 0.5, begin_step=0, end_step=4, every=2), scope="global",
                    max_layer_sparsity=0.6, types=[nn.Linear], include="encoder", exclude=["encoder.2"])
    first = Pruner(mlp(), **settings)
    first.to_recipe().save(tmp_path / "run.yaml")
    again = Pruner.from_recipe(mlp(), tmp_path / "run.yaml")
    assert again.to_recipe() == first.to_recipe()
    assert [t.name for t in again.targets] == [t.name for t in first.targets] == ["encoder.0"]
    assert again.schedule == first.schedule and again.scope == "global" and again.max_layer_sparsity == 0.6


def test_the_example_recipes_say_the_same_and_build_a_pruner_for_bert():
    import transformers

    yaml_recipe = load_recipe(EXAMPLES / "bert-movement.yaml")
    toml_recipe = load_recipe(EXAMPLES / "bert-movement.toml")
    assert yaml_recipe == toml_recipe
    assert yaml_recipe.schedule == CubicRamp(0.0, 0.9, begin_step=100, end_step=2000, every=50)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    model = transformers.BertForSequenceClassification(config)
    pruner = Pruner.from_recipe(model, EXAMPLES / "bert-movement.yaml")
    assert pruner.criterion.name == "movement" and len(pruner.targets) == 6  # no pooler, no classifier
    assert pruner.to_recipe() == yaml_recipe


def test_gpt2_conv1d_is_a_type_a_recipe_names():
    import transformers

    model = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50,
                                                           n_positions=8))
    pruner = Pruner.from_recipe(model, {"types": ["Conv1D"], "schedule": {"kind": "Constant", "final": 0.5}})
    assert len(pruner.targets) == 4 and pruner.to_recipe().types == ("Conv1D",)


def test_a_recipe_has_every_setting_of_the_pruner_and_its_defaults():
    defaults = {k: p.default for k, p in inspect.signature(Pruner).parameters.items()}
    settings = (set(defaults) - {"model", "process_group", "sparsity"}) | {"schedule"}
    assert settings == {f.name for f in fields(Recipe)} - {"distill", "oneshot"}  # a new Pruner setting needs a key
    recipe = Recipe(Constant(defaults["sparsity"]))
    assert Recipe.from_dict({"schedule": {"kind": "Constant", "final": defaults["sparsity"]}}) == recipe
    for key in ("criterion", "pattern", "scope", "types", "include", "max_layer_sparsity"):
        assert getattr(recipe, key) == defaults[key], key
    assert recipe.exclude == tuple(defaults["exclude"])
    assert Pruner(mlp()).to_recipe() == recipe


def test_pattern_spelling_is_normalised():
    assert Recipe(Constant(0.5), pattern=" 2 : 4 ").pattern == "2:4"


SCHEDULE = {"kind": "LinearRamp", "final": 0.5, "end_step": 10}
BAD = [  # (recipe, what the message must say)
    ({"schedule": SCHEDULE, "sparsity": 0.5},
     "unknown recipe key 'sparsity'; allowed keys: ['schedule', 'criterion'"),
    ({"criterion": "movement"}, "recipe key 'schedule' is missing"),
    ({"schedule": 0.5}, "recipe key 'schedule': expected a table"),
    ({"schedule": {"kind": "Cubic2", "final": 0.5}},
     "'schedule.kind': unknown value 'Cubic2'; allowed: ['Constant'"),
    ({"schedule": {"final": 0.5}}, "'schedule.kind': unknown value None"),
    ({"schedule": {"kind": "Constant", "final": 0.5, "end_step": 3}},
     "'schedule.end_step': not an argument of Constant; allowed: ['final', 'begin_step']"),
    ({"schedule": {"kind": "CubicRamp", "end_step": 3}}, "'schedule.final' is missing"),
    ({"schedule": {**SCHEDULE, "final": 1.5}},
     "(LinearRamp): final sparsity must be a sparsity in [0, 1), got 1.5"),
    ({"schedule": {**SCHEDULE, "every": True}}, "every must be a positive integer number of steps, got True"),
    ({"schedule": {**SCHEDULE, "begin_step": 20}}, "end_step (10) is before begin_step (20)"),
    ({"schedule": SCHEDULE, "criterion": "snip"}, "'criterion': unknown value 'snip'; allowed: ['magnitude'"),
    ({"schedule": SCHEDULE, "pattern": "2:2"}, "'pattern': unknown pattern '2:2'"),
    ({"schedule": SCHEDULE, "scope": "model"},
     "'scope': unknown value 'model'; allowed: ['layer', 'row', 'global']"),
    ({"schedule": SCHEDULE, "types": ["Linear", "LSTM"]},
     "'types': unknown value 'LSTM'; allowed: ['Bilinear'"),
    ({"schedule": SCHEDULE, "include": [3]},
     "'include': expected a string, a list of non-empty strings or null"),
    ({"schedule": SCHEDULE, "exclude": None}, "'exclude': expected a string or a list of non-empty strings"),
    ({"schedule": SCHEDULE, "exclude": [""]}, "'exclude': expected"),
    ({"schedule": SCHEDULE, "max_layer_sparsity": 0.9}, "max_layer_sparsity only applies to scope='global'"),
    ({"schedule": SCHEDULE, "scope": "global", "max_layer_sparsity": "high"},
     "'max_layer_sparsity': expected a number"),
    ({"schedule": SCHEDULE, "scope": "global", "max_layer_sparsity": 1.5}, "must be in (0, 1], got 1.5"),
    ({"schedule": {"kind": "Constant", "final": 0.5}, "pattern": "2:4", "scope": "row"},
     "scope 'row' does not apply to N:M pattern 2:4"),
    ([{"criterion": "movement"}], "a recipe is a mapping of settings, got list"),
    ({"schedule": SCHEDULE, "distill": 2.0}, "recipe key 'distill': expected a table of Distiller settings"),
    ({"schedule": SCHEDULE, "distill": {"temp": 2}},
     "recipe key 'distill.temp': not a Distiller setting; allowed: ['temperature'"),
    ({"schedule": SCHEDULE, "distill": {"temperature": 0}}, "recipe key 'distill': temperature must be positive"),
    ({"schedule": SCHEDULE, "distill": {"task_weight": "1"}}, "'distill': task_weight must be a number, got '1'"),
    ({"schedule": SCHEDULE, "distill": {"hidden_loss": "kl"}}, "'distill': unknown hidden_loss 'kl'; allowed: mse"),
    ({"schedule": SCHEDULE, "distill": {"hidden": "encoder.0"}}, "'distill': hidden must be a mapping"),
    ({"schedule": SCHEDULE, "distill": {"hidden": [""]}}, "'distill': hidden names modules by non-empty strings"),
]


BAD += [
    ({"oneshot": {"methd": "wanda"}},
     "recipe key 'oneshot.methd': not a one-shot setting; allowed: ['method', 'sparsity', 'pattern'"),
    ({"oneshot": {"method": "obs"}}, "recipe key 'oneshot': unknown method 'obs'"),
    ({"oneshot": {"pattern": "2:4", "sparsity": 0.7}}, "recipe key 'oneshot': pattern 2:4 means sparsity 0.5"),
    ({"oneshot": 0.5}, "recipe key 'oneshot': expected a table of one-shot settings"),
]


@pytest.mark.parametrize("data, message", BAD)
def test_bad_recipes_name_the_key_and_what_is_allowed(data, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Recipe.from_dict(data)


BAD_FILES = [
    ("run.yaml", "criterion: movement\ncriterion: magnitude\nschedule: {kind: Constant, final: 0.5}\n",
     "recipe key 'criterion' appears twice"),
    ("run.yaml", "schedule: {kind: Constant, final: 0.5\n", "not valid YAML"),
    ("run.yaml", "", "a recipe is a mapping of settings, got NoneType"),
    ("run.yaml", "schedule: !!python/object:os.system {}\n", "not valid YAML"),  # safe loading only
    ("run.yaml", "schedule: {kind: Constant, final: 9e-1}\n", "got '9e-1'"),  # YAML 1.1: 9e-1 is a string
    ("run.yaml", "pattern: 2:4\nschedule: {kind: Constant, final: 0.5}\n", "unquoted, 2:4 is the number 124"),
    ("run.yaml", "criterion: [movement]\nschedule: {kind: Constant, final: 0.5}\n",
     "'criterion': unknown value ['movement']; allowed: ['magnitude'"),
    ("run.yaml", "schedule: {kind: {a: 1}, final: 0.5}\n", "'schedule.kind': unknown value {'a': 1}"),
    ("run.toml", "criterion = movement\n", "not valid TOML"),
    ("run.toml", 'scope = "layer"\nscope = "global"\n', "not valid TOML"),
    ("run.json", "{}", "unknown suffix '.json'; allowed: ['.toml', '.yaml', '.yml']"),
    ("run.toml", '[schedule]\nkind = "Constant"\nfinal = 0.5\n[extra]\nx = 1\n',
     "unknown recipe key 'extra'"),
    ("run.yaml", "oneshot: {pattern: 2:4}\n", "'oneshot.pattern': expected a string"),
]


@pytest.mark.parametrize("name, text, message", BAD_FILES)
def test_bad_files_name_the_file_and_the_problem(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        load_recipe(tmp_path / name)
    assert str(tmp_path / name) in str(e.value)


def test_settings_a_recipe_cannot_name_are_refused():
    class Random(Criterion):
        name = "random"

        def score(self, weight, evidence):
            return torch.rand(weight.shape)

    with pytest.raises(ValueError, match="criterion <criterion random> is not registered in prune.criteria"):
        Pruner(mlp(), sparsity=0.5, criterion=Random()).to_recipe()

    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(4, 4))
    with pytest.raises(ValueError, match=re.escape(f"has no name in recipes; allowed: {module_types()}")):
        Pruner(model, sparsity=0.5, types=[MyLinear]).to_recipe()


def test_a_recipe_the_pruner_refuses_fails_when_the_pruner_is_built():
    # checks that need the settings together with the schedule are the Pruner's own
    with pytest.raises(ValueError, match="cannot prune at step 0"):
        Pruner.from_recipe(mlp(), {"criterion": "movement", "schedule": {"kind": "Constant", "final": 0.5}})
    with pytest.raises(ValueError, match="pattern 2:4 means sparsity 0.5"):
        Pruner.from_recipe(mlp(), {"pattern": "2:4", "schedule": {"kind": "Constant", "final": 0.9}})


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
@pytest.mark.parametrize("schedule", [None, Constant(0.5)])
def test_the_oneshot_table_is_a_oneshot_config(tmp_path, suffix, schedule):
    config = OneShotConfig(method="wanda", pattern="2:4", exclude=("lm_head",), samples=16, sequential=True)
    recipe = Recipe(schedule, oneshot={"method": "wanda", "pattern": "2:4", "exclude": ["lm_head"], "samples": 16,
                                       "sequential": True})
    assert recipe.oneshot == config
    recipe.save(tmp_path / f"run{suffix}")
    assert load_recipe(tmp_path / f"run{suffix}") == recipe == Recipe.from_dict(recipe.to_dict())
    if schedule is None:  # one-shot settings only: no Pruner
        with pytest.raises(ValueError, match="no 'schedule', only one-shot settings"):
            Pruner.from_recipe(mlp(), recipe)
    else:
        assert Pruner.from_recipe(mlp(), recipe).to_recipe().schedule == schedule
