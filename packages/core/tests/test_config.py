"""Recipe validation, overrides and bundled recipes."""

from __future__ import annotations

import pytest
import yaml

from plugtune.config import (
    RecipeError,
    apply_overrides,
    list_bundled_recipes,
    load_recipe,
    validate_recipe,
)

BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}


def test_minimal_recipe_defaults():
    r = validate_recipe(dict(BASE))
    assert r.adapter == "lora" and r.lora_r == 16 and r.lora_alpha == 32
    assert r.dtype == "auto" and r.trust_remote_code is False and r.train_on_inputs is False


def test_unknown_top_level_key_suggests_closest():
    with pytest.raises(RecipeError) as exc:
        validate_recipe({**BASE, "lora_rank": 8}, source="r.yaml")
    msg = str(exc.value)
    assert "r.yaml" in msg and "lora_rank" in msg and "did you mean 'lora_r'" in msg


def test_unknown_nested_key_names_path_and_suggestion():
    with pytest.raises(RecipeError) as exc:
        validate_recipe({"base_model": "m", "datasets": [{"path": "d", "tpye": "alpaca"}]})
    msg = str(exc.value)
    assert "datasets[0].tpye" in msg and "did you mean 'type'" in msg


def test_wrong_type_names_key_and_value():
    with pytest.raises(RecipeError) as exc:
        validate_recipe({**BASE, "micro_batch_size": "four"})
    assert "micro_batch_size" in str(exc.value) and "'four'" in str(exc.value)


def test_bad_dataset_type_lists_choices():
    with pytest.raises(RecipeError) as exc:
        validate_recipe({"base_model": "m", "datasets": [{"path": "d", "type": "alpacca"}]})
    assert "datasets[0].type" in str(exc.value) and "alpaca" in str(exc.value)


def test_inconsistent_quantization_rejected():
    with pytest.raises(RecipeError, match="fully fine-tuned"):
        validate_recipe({**BASE, "adapter": "none", "load_in_4bit": True})
    assert validate_recipe({**BASE, "adapter": "qlora"}).quantization == "4bit"


def test_overrides_dotted_paths_and_types():
    data = apply_overrides(yaml.safe_load(yaml.safe_dump(BASE)), [
        "learning_rate=2e-4", "sample_packing=true", "datasets.0.path=x.jsonl",
        "generation.max_new_tokens=7", "lora_target_modules=[q, v]"])
    r = validate_recipe(data)
    assert r.learning_rate == 2e-4 and r.sample_packing is True
    assert r.datasets[0].path == "x.jsonl" and r.generation.max_new_tokens == 7
    assert r.lora_target_modules == ["q", "v"]


def test_override_without_equals_is_clear():
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        apply_overrides({}, ["max_steps"])


def test_load_recipe_file_with_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(BASE))
    r = load_recipe(p, ["max_steps=3"])
    assert r.max_steps == 3


def test_invalid_yaml_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("base_model: [unclosed\n")
    with pytest.raises(RecipeError, match="bad.yaml"):
        load_recipe(p)


def test_unknown_recipe_name_suggests_bundled():
    with pytest.raises(RecipeError, match="did you mean 'demo'|Did you mean 'demo'"):
        load_recipe("dmeo")


def test_every_bundled_recipe_validates():
    recipes = list_bundled_recipes()
    assert "demo" in recipes and "stories260k-dolly-lora" in recipes
    for name in recipes:
        load_recipe(name)


def test_top_level_per_dataset_key_points_at_datasets():
    from plugtune.config import RecipeError, validate_recipe

    with pytest.raises(RecipeError, match=r"on_bad_row: unknown key; did you mean datasets\[\]\.on_bad_row\?"):
        validate_recipe({"base_model": "m", "datasets": [{"path": "a"}], "on_bad_row": "skip"})
