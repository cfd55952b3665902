"""Config dialects: axolotl, LLaMA-Factory and TRL configs read in place from ../shared/data/configs
(not copied), translated into plugtune recipes; config errors before torch is imported."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from plugtune.config import Recipe, RecipeError, did_you_mean, load_config, validate_recipe
from plugtune.config.dialects import axolotl, llamafactory, translate, trl
from plugtune.testing import shared_path


def _configs(tool: str) -> list:
    try:
        folder = shared_path("configs", tool)
    except BaseException:  # pytest.skip outside a test: collect nothing
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".yml", ".yaml"))


AXOLOTL = _configs("axolotl")


@pytest.mark.parametrize("path", AXOLOTL, ids=lambda p: p.name)
def test_every_key_of_axolotls_examples_is_plugtunes_or_in_the_axolotl_table(path):
    data = yaml.safe_load(path.read_text())
    for key in data:
        assert key in Recipe.model_fields or key in axolotl.KEYS, f"{path.name}: {key}"


def test_axolotl_table_groups_and_counts():
    groups = axolotl.key_table()
    assert set(groups) == {"honoured", "mapped", "noted", "refused"}
    # 388 keys of AxolotlInputConfig @ 067b021c + the two obsolete gptq_* keys of its examples
    assert sum(len(v) for v in groups.values()) == 390
    honoured = {k for k, _ in groups["honoured"]}
    # honoured keys are plugtune's own (the method keys come from the rl: methods)
    method_keys = {"dpo_beta", "kto_desirable_weight", "kto_undesirable_weight", "orpo_alpha",
                   "simpo_gamma", "cpo_alpha", "dpo_label_smoothing", "reward_model", "rl"}
    assert honoured - method_keys <= set(Recipe.model_fields)


def test_llama2_lora_config_translates_with_axolotls_meaning():
    recipe, tr = load_config(shared_path("configs", "axolotl", "llama-2__lora.yml"))
    assert tr.dialect == "axolotl"
    assert recipe.adapter == "lora" and recipe.load_in_8bit and recipe.lora_r == 32
    assert recipe.lora_target_modules == "all-linear"  # lora_target_linear: true
    assert recipe.dtype == "auto"  # bf16: auto
    assert recipe.evals_per_epoch == 4 and recipe.saves_per_epoch == 1
    assert recipe.attn_implementation == "flash_attention_2"  # falls back to sdpa at load time
    assert recipe.optimizer == "adamw_bnb_8bit"  # falls back on CPU at train time
    assert recipe.report_to == "none" and recipe.report_env == {}  # empty wandb_* are unset
    assert tr.resume is None  # resume_from_checkpoint: (empty)
    assert "model_type" not in tr.data  # LlamaForCausalLM is a class name in axolotl


def test_axolotl_without_adapter_is_a_full_finetune_and_defaults_are_axolotls():
    tr = translate({"base_model": "m", "bf16": True, "datasets": [{"path": "a", "type": "alpaca"}]})
    assert tr.data["adapter"] == "none" and tr.data["dtype"] == "bf16"
    assert tr.data["micro_batch_size"] == 1 and tr.data["lora_dropout"] == 0.0


def test_axolotl_mapped_keys():
    tr = translate({"base_model": "m", "datasets": [{"path": "a", "type": "alpaca"}],
                    "adapter": "lora", "wandb_project": "p", "wandb_entity": "e",
                    "use_tensorboard": True, "batch_size": 8, "micro_batch_size": 2,
                    "model_type": "AutoModelForSequenceClassification", "rl_beta": 0.3,
                    "default_system_message": "Be brief.", "attn_implementation": "xformers",
                    "resume_from_checkpoint": "out/checkpoint-4", "dpo_loss_type": ["ipo"]})
    d = tr.data
    assert d["report_to"] == ["wandb", "tensorboard"]
    assert d["report_env"] == {"WANDB_PROJECT": "p", "WANDB_ENTITY": "e"}
    assert d["gradient_accumulation_steps"] == 4 and d["reward_model"] is True
    assert d["dpo_beta"] == 0.3 and d["dpo_loss_type"] == "ipo"
    assert d["datasets"][0]["system_prompt"] == "Be brief."
    assert d["attn_implementation"] == "sdpa" and any("xformers" in n for n in tr.notices)
    assert tr.resume == "out/checkpoint-4"


def test_axolotl_refused_key_names_what_plugtune_lacks_and_off_values_pass():
    base = {"base_model": "m", "datasets": [{"path": "a", "type": "alpaca"}], "adapter": "lora"}
    with pytest.raises(RecipeError) as err:
        translate({**base, "relora": True, "tensor_parallel_size": 2}, source="x.yml")
    msg = str(err.value)
    assert "x.yml" in msg and "relora: True" in msg and "no ReLoRA" in msg
    assert "tensor_parallel_size: 2" in msg and "no tensor" in msg and "unknown key" not in msg
    # unset, false and axolotl's default values are not a request
    translate({**base, "relora": False, "gptq": False, "fsdp": None, "qgalore_rank": 256})


def test_axolotl_fsdp_maps_onto_plugtunes_presets():
    base = {"base_model": "m", "datasets": [{"path": "a", "type": "alpaca"}], "adapter": "lora",
            "wandb_project": None}
    assert translate({**base, "fsdp": ["full_shard", "auto_wrap"]}).data["fsdp"] == "full_shard"
    assert translate({**base, "fsdp": "full_shard offload"}).data["fsdp"] == "full_shard_offload"
    tr = translate({**base, "fsdp_version": 2, "fsdp_config": {
        "reshard_after_forward": False, "state_dict_type": "FULL_STATE_DICT"}})
    assert tr.data["fsdp"] == "shard_grad_op" and "state_dict_type" in tr.notices[0]
    with pytest.raises(RecipeError, match="FSDP2 only"):
        translate({**base, "fsdp_version": 1, "fsdp": ["full_shard"]})


def test_a_method_key_without_its_method_is_axolotls_not_unknown(tmp_path):
    cfg = tmp_path / "kto.yml"
    cfg.write_text("base_model: m\nrl: kto\nkto_desirable_weight: 0.2\nwandb_project:\n"
                   "datasets:\n  - path: a\n    type: alpaca\n")
    try:
        load_config(cfg)
    except RecipeError as exc:  # without a KTO method installed
        assert "kto_desirable_weight: axolotl's key, but a key of the kto training method" in str(exc)
        assert "unknown key" not in str(exc)


def test_axolotl_noted_key_gives_one_notice():
    tr = translate({"base_model": "m", "datasets": [{"path": "a", "type": "alpaca"}],
                    "dataset_prepared_path": "last_run_prepared", "push_dataset_to_hub": None})
    assert [n.split(":")[0] for n in tr.notices] == ["dataset_prepared_path", "datasets"]


def test_axolotl_alpaca_datasets_get_the_alpaca_prompt_not_the_tokenizers_template():
    """axolotl renders type: alpaca with Stanford's prompt whatever the tokenizer's template."""
    from plugtune.data.templates import ALPACA_PREAMBLE

    base = {"base_model": "m", "wandb_project": None, "datasets": [{"path": "a", "type": "alpaca"}]}
    tr = translate(base)
    assert tr.data["chat_template"] == "alpaca"
    assert any(n.startswith("datasets: type alpaca: chat_template: alpaca") for n in tr.notices)
    assert ALPACA_PREAMBLE.startswith("Below is an instruction that describes a task.")
    # an explicit chat_template wins; other dataset types keep the tokenizer's template
    assert translate(dict(base, chat_template="chatml")).data["chat_template"] == "chatml"
    mixed = dict(base, datasets=[{"path": "a", "type": "alpaca"}, {"path": "b", "type": "chat_template"}])
    assert "chat_template" not in translate(mixed).data


def test_a_key_neither_plugtunes_nor_axolotls_is_still_unknown_with_a_plausible_hint_only():
    data = {"base_model": "m", "datasets": [{"path": "a", "type": "alpaca"}],
            "wandb_project": None, "learing_rate": 1e-4, "zzz_frobnicate": 1}
    with pytest.raises(RecipeError) as err:
        validate_recipe(translate(data).data)
    msg = str(err.value)
    assert "learing_rate: unknown key; did you mean 'learning_rate'?" in msg
    assert "zzz_frobnicate: unknown key\n" in msg + "\n"
    # the old matcher (cutoff 0.5) suggested unrelated keys
    assert did_you_mean("wandb_entity", list(Recipe.model_fields)) == ""
    assert did_you_mean("resume_from_checkpoint", list(Recipe.model_fields)) == ""
    assert "sequence_len" in did_you_mean("sequence_length", list(Recipe.model_fields))


def test_plugtune_recipe_is_not_translated():
    data = {"base_model": "m", "datasets": [{"path": "a", "type": "alpaca"}]}
    tr = translate(data)
    assert tr.dialect == "plugtune" and tr.data == data


_AXOLOTL_BAD = ("base_model: x\nwandb_project:\nbf16: auto\n{key}: 3\n"
                "datasets:\n  - path: a.jsonl\n    type: alpaca\n")
_PLAIN_BAD = "base_model: x\n{key}: 3\ndatasets:\n  - path: a.jsonl\n"


@pytest.mark.parametrize("text, key, expected", [
    (_AXOLOTL_BAD, "learing_rate", "learing_rate: unknown key; did you mean 'learning_rate'?"),
    # no close match: validation retries with every installed plugin's keys, which must not
    # import torch either (plugin modules keep heavy imports inside their hooks)
    (_AXOLOTL_BAD, "frobnicate_level", "frobnicate_level: unknown key\n"),
    (_PLAIN_BAD, "frobnicate_level", "frobnicate_level: unknown key\n"),
], ids=["axolotl-typo", "axolotl-unknown", "plain-unknown"])
def test_config_error_comes_before_torch_is_imported(tmp_path, text, key, expected):
    """`plugtune train bad.yml` in a fresh interpreter: the error, and torch never imported."""
    bad = tmp_path / "bad.yml"
    bad.write_text(text.format(key=key))
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "plugtune", "train", str(bad)],
                         capture_output=True, text=True)
    assert res.returncode == 2, res.stderr[-2000:]
    assert expected in res.stderr + "\n"
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines()
                if line.startswith("import time:")}
    assert "plugtune.config" in imported and "yaml" in imported
    heavy = {"torch", "transformers", "datasets", "plugtune.data.collate", "plugtune.modeling"}
    assert not heavy & imported


def test_recipe_convert_prints_a_recipe_that_validates(tmp_path):
    from plugtune.cli import main

    src = shared_path("configs", "axolotl", "mistral__qlora.yml")
    out = subprocess.run([sys.executable, "-m", "plugtune", "recipe", "convert", str(src)],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("# plugtune recipe from the axolotl config")
    assert "# note: dataset_prepared_path: ignored" in out
    converted = tmp_path / "converted.yml"
    converted.write_text(out)
    recipe, tr = load_config(converted)
    assert tr.dialect == "plugtune"  # the output is a plain plugtune recipe
    assert recipe == load_config(src)[0]
    assert main(["recipe", "convert", str(tmp_path / "missing.yml")]) == 2


def test_llamafactory_training_yaml_translates():
    data = yaml.safe_load(shared_path("configs", "llama_factory", "llama3_lora_sft_otfq.yaml")
                          .read_text())
    assert llamafactory.detect(data) and not llamafactory.detect({"base_model": "m"})
    data = {k: v for k, v in data.items() if k != "dataset"}  # the datasets: see below
    tr = translate(data, "otfq.yaml")
    assert tr.dialect == "LLaMA-Factory"
    d = tr.data
    assert d["base_model"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert d["adapter"] == "qlora" and d["lora_r"] == 8 and d["lora_alpha"] == 16
    assert d["lora_target_modules"] == "all-linear" and d["sequence_len"] == 2048
    assert d["micro_batch_size"] == 1 and d["gradient_accumulation_steps"] == 8
    assert d["num_epochs"] == 3.0 and d["lr_scheduler"] == "cosine" and d["dtype"] == "bf16"
    assert d["chat_template"] == "tokenizer"  # template: llama3 = the tokenizer's template
    assert any(n.startswith("template: llama3:") and "date" in n for n in tr.notices)
    # LLaMA-Factory truncates to cutoff_len; plugtune drops what does not fit: a note says so
    cut = translate(dict(data, cutoff_len=1024))
    assert cut.data["sequence_len"] == 1024
    assert any(n.startswith("cutoff_len:") and "drops" in n for n in cut.notices)
    dpo = yaml.safe_load(shared_path("configs", "llama_factory", "llama3_lora_dpo.yaml").read_text())
    dpo.pop("dataset")
    assert translate(dpo).data["rl"] == "dpo" and translate(dpo).data["dpo_beta"] == 0.1
    full = yaml.safe_load(shared_path("configs", "llama_factory", "llama3_full_sft.yaml").read_text())
    full.pop("dataset")
    tr = translate(full)
    assert tr.data["adapter"] == "none" and tr.data["deepspeed"] == "zero3"
    with pytest.raises(RecipeError, match="stage: 'ppo'"):
        translate({**full, "stage": "ppo"})
    with pytest.raises(RecipeError, match="use_unsloth"):
        translate({**full, "use_unsloth": True})
    # Liger's kernels: LLaMA-Factory's switch is plugtune's liger_kernel key
    assert translate({**full, "enable_liger_kernel": True}).data["liger_kernel"] is True
    assert translate({**full, "enable_liger_kernel": False}).data["liger_kernel"] is False


def test_llamafactory_dataset_names_resolve_through_dataset_info():
    pytest.importorskip("plugtune.data.registry",
                        reason="LLaMA-Factory dataset_info.json reading is not in this checkout")
    src = shared_path("configs", "llama_factory", "llama3_lora_sft.yaml")
    recipe, tr = load_config(src, [f"dataset_dir={shared_path('llama_factory')}"])
    assert tr.dialect == "LLaMA-Factory" and len(recipe.datasets) == 2
    assert all(d.max_samples == 1000 for d in recipe.datasets)


def test_trl_cli_config_and_alignment_handbook_recipes_translate():
    tr = translate(yaml.safe_load(shared_path("configs", "trl", "trl__example_config.yaml").read_text()))
    assert tr.dialect == "TRL" and tr.data["base_model"] == "Qwen/Qwen2.5-0.5B"
    assert tr.data["datasets"] == [{"path": "stanfordnlp/imdb", "split": "train", "type": "text"}]
    assert tr.data["adapter"] == "none"  # TRL trains all weights unless use_peft
    zephyr = shared_path("configs", "trl", "alignment-handbook__zephyr-7b-beta_dpo_config_qlora.yaml")
    recipe, tr = load_config(zephyr)
    assert recipe.rl == "dpo" and recipe.adapter == "qlora" and recipe.lora_r == 128
    assert [(d.path, d.split) for d in recipe.datasets] == [
        ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")]
    assert recipe.test_datasets[0].split == "test_prefs"
    assert recipe.optimizer == "paged_adamw_32bit" and recipe.sequence_len == 1024
    assert trl.detect(yaml.safe_load(zephyr.read_text()))
    with pytest.raises(RecipeError, match="use_liger_kernel: a TrainingArguments key"):
        translate({"model_name_or_path": "m", "use_liger_kernel": True})
    with pytest.raises(RecipeError, match="did you mean 'learning_rate'"):
        translate({"model_name_or_path": "m", "learnin_rate": 1.0})
