"""LoRA targets: auto = q,v; all-linear = every T5 Linear but lm_head; explicit names checked."""

from __future__ import annotations

import pytest

from plugtune.config import RecipeError
from plugtune.testing import make_spec
from plugtune_t5.tiny import tiny_t5


@pytest.fixture(scope="module")
def spec_pm():
    return make_spec("t5")


def _targets(spec_pm, model, method):
    spec, pm = spec_pm
    return pm.hook.plugtune_target_modules(spec=spec, model=model, method=method)


def test_auto_is_q_and_v(spec_pm):
    assert _targets(spec_pm, tiny_t5(), "auto") == ["q", "v"]


def test_all_linear_gated_and_plain_ffn(spec_pm):
    assert _targets(spec_pm, tiny_t5(), "all-linear") == ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
    plain = tiny_t5(gated=False)
    assert _targets(spec_pm, plain, "all-linear") == ["q", "k", "v", "o", "wi", "wo"]


def test_explicit_names_and_regex_are_checked(spec_pm):
    model = tiny_t5()
    assert _targets(spec_pm, model, ["q", "k", "wo"]) == ["q", "k", "wo"]
    assert _targets(spec_pm, model, "wo") == ["wo"]
    rx = r".*decoder.*EncDecAttention\.(q|v)"
    assert _targets(spec_pm, model, rx) == rx
    with pytest.raises(RecipeError, match=r"\['q_proj'\] not in this T5 model.*wi_0"):
        _targets(spec_pm, model, ["q", "q_proj"])
    with pytest.raises(RecipeError, match="matches no Linear module"):
        _targets(spec_pm, model, "lm_head_nope")
    with pytest.raises(RecipeError, match="not in this T5 model"):
        _targets(spec_pm, model, ["lm_head"])


def test_lora_on_targets_trains_only_adapters(spec_pm):
    from peft import LoraConfig, TaskType, get_peft_model

    model = tiny_t5()
    targets = _targets(spec_pm, model, "all-linear")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  task_type=TaskType.SEQ_2_SEQ_LM))
    wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters()
               if ".lora_A" in n}
    assert wrapped == set(targets)
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
