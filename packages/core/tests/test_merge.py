"""``plugtune merge``: merged logits equal base + adapter (LoRA, and QLoRA against the dequantized
base), standalone loading with ``AutoModelForCausalLM``, atomic and non-destructive output."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from plugtune.config import dump_recipe, validate_recipe
from plugtune.merge import MergeError, merge_run
from plugtune.testing import shared_path

IDS = torch.tensor([[1, 300, 301, 302, 50, 60, 70, 80, 90, 100, 7, 9]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _train(tmp_path, adapter: str):
    from plugtune.train import train

    torch.set_num_threads(1)
    recipe = validate_recipe(dict(
        base_model=str(shared_path("models", "stories260K", "hf")), adapter=adapter,
        chat_template="alpaca", lora_target_modules="all-linear", lora_dropout=0.0,
        datasets=[dict(path=str(shared_path("dolly", "dolly_validation_151.instruction_context_response.jsonl")),
                       type="dolly", max_samples=16)],
        sequence_len=128, micro_batch_size=4, learning_rate=1e-2, max_steps=3, logging_steps=1,
        output_dir=str(tmp_path / adapter)))
    return train(recipe).output_dir


def _check_standalone(out, run):
    assert not (out / "adapter_config.json").exists()
    assert list(out.glob("*.safetensors"))
    info = json.loads((out / "plugtune_merge.json").read_text())
    assert info["auto_class"] == "AutoModelForCausalLM" and info["adapter"] is True
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(run).chat_template
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return info


@pytest.mark.slow
def test_lora_merge_equals_base_plus_adapter(tmp_path):
    from peft import PeftModel

    run = _train(tmp_path, "lora")
    out = merge_run(run, tmp_path / "merged")
    info = _check_standalone(out, run)
    assert info["merged_into"] == "original full-precision base"
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(shared_path("models", "stories260K", "hf"))
    plain = _logits(base)
    ref = _logits(PeftModel.from_pretrained(base, str(run)))
    got = _logits(merged)
    assert (ref - plain).abs().max() > 1e-2, "the adapter changes nothing; test is vacuous"
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_qlora_merges_into_the_dequantized_base(tmp_path):
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    from plugtune.runs import load_run

    run = _train(tmp_path, "qlora")
    out = merge_run(run, tmp_path / "merged")
    info = _check_standalone(out, run)
    assert info["trained_on"] == "4bit" and info["merged_into"] == "dequantized 4bit base"
    merged = AutoModelForCausalLM.from_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    got = _logits(merged)

    # reference 1: the same 4-bit base, dequantized independently, plus the unmerged adapter
    path = shared_path("models", "stories260K", "hf")
    q = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16))
    deq = q.dequantize(dtype=torch.float32).float()
    ref = _logits(PeftModel.from_pretrained(deq, str(run)))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

    # reference 2: the model as trained (4-bit base, bf16 compute, adapter): equal up to bf16
    _, loaded, _ = load_run(run)
    trained = _logits(loaded.model)
    scale = trained.abs().max()
    assert (got - trained).abs().max() < 0.05 * scale

    # merging into the original fp32 weights instead differs by the quantization error
    orig = AutoModelForCausalLM.from_pretrained(
        merge_run(run, tmp_path / "merged-original", base="original"))
    base = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(_logits(orig), _logits(PeftModel.from_pretrained(base, str(run))),
                               atol=1e-4, rtol=1e-4)
    assert (_logits(orig) - got).abs().max() > 1e-2


def _full_run(tmp_path):
    """A finished full-weight run directory, written without training (fast)."""
    from plugtune.plugins import get_plugin_manager
    from plugtune.train import build_spec

    src = shared_path("models", "stories260K", "hf")
    run = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(run)
    AutoTokenizer.from_pretrained(src).save_pretrained(run)
    recipe = validate_recipe(dict(base_model=str(src), adapter="none", output_dir=str(run),
                                  datasets=[dict(path="unused.jsonl", type="alpaca")]))
    build_spec(recipe, get_plugin_manager())  # routable
    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    return run, model


def test_full_weight_run_exports_and_guards_out_dir(tmp_path):
    run, model = _full_run(tmp_path)
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="not empty.*--force"):
        merge_run(run, out)
    assert (out / "keep.txt").read_text() == "mine"  # untouched
    merge_run(run, out, force=True)
    assert not (out / "keep.txt").exists()
    again = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(again), _logits(model))
    assert json.loads((out / "plugtune_merge.json").read_text())["adapter"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]  # no temp leftovers


def test_merge_cli_errors_are_one_line(tmp_path, capsys):
    from plugtune.cli import main

    assert main(["merge", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "not a plugtune run directory" in " ".join(capsys.readouterr().err.split())
    run, _ = _full_run(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    assert main(["merge", str(run), str(tmp_path / "out")]) == 2
    assert "--force" in " ".join(capsys.readouterr().err.split())
    assert main(["merge", str(run), str(tmp_path / "out"), "--force", "--dtype", "bf16"]) == 0
    cfg = yaml.safe_load((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"


# -- plugtune quantize -------------------------------------------------------------------------

def test_gptq_needs_cuda_and_says_so(tmp_path, capsys):
    from plugtune.cli import main
    from plugtune.quantize import QuantizeError, check_method_available

    if torch.cuda.is_available():
        pytest.skip("this check is for machines without CUDA")
    with pytest.raises(QuantizeError, match="GPTQ quantization needs a CUDA GPU"):
        check_method_available("gptq")
    src = shared_path("models", "stories260K", "hf")
    assert main(["quantize", str(src), "--method", "gptq", "--out", str(tmp_path / "q")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "GPTQ quantization needs a CUDA GPU" in err and "--method bnb4" in err
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method,max_ppl_change", [("bnb4", 0.5), ("bnb8", 0.1)])
def test_bnb_quantize_report(tmp_path, method, max_ppl_change):
    from plugtune.quantize import quantize

    torch.set_num_threads(1)
    src = shared_path("models", "stories260K", "hf")
    held_out = shared_path("dolly", "dolly_validation_151.instruction_context_response.jsonl")
    rep = quantize(src, method, tmp_path / "q", eval_data=str(held_out), eval_type="dolly",
                   max_samples=8, max_new_tokens=8)
    ref, q = rep["reference"], rep["quantized"]
    assert rep["device"] == ("cuda" if torch.cuda.is_available() else "cpu") and rep["rows"] > 0
    assert q["size_bytes"] < 0.6 * ref["size_bytes"]  # 4/8-bit Linear weights
    assert 1 < ref["perplexity"] and 1 < q["perplexity"]
    assert q["perplexity"] != ref["perplexity"]  # really a different (quantized) model
    assert abs(rep["perplexity_change"]) < max_ppl_change
    assert ref["tokens_per_second"] > 0 and q["tokens_per_second"] > 0
    saved = json.loads((tmp_path / "q" / "quantize_report.json").read_text())
    assert saved == rep
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["load_in_4bit" if method == "bnb4" else "load_in_8bit"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")  # reloads quantized
    if method == "bnb4" and not torch.cuda.is_available():
        from plugtune.kbit import cpu_4bit_fallback

        cpu_4bit_fallback(again)  # stories260K's 64x172 layers: bitsandbytes' CPU kernel refuses them
    assert torch.isfinite(_logits(again)).all()
