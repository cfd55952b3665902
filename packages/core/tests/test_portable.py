"""Portable run folders: a run trained from a relative base path loads from any directory with
plain peft / transformers, its model card is valid Hub metadata and its snippet runs as written
(also after tokens were added), and a moved base gives an error that names it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import torch
import yaml

from plugtune.config import validate_recipe
from plugtune.train import train

PROMPTS = ["reverse abc =", "reverse hello ="]


def _train(tmp_path, monkeypatch, make_tiny_llama, chat_template="chatml", adapter="lora"):
    """A 2-step LoRA run on a tiny Llama with the real Llama-2 tokenizer, trained from
    ``tmp_path/work`` with a *relative* base path (as a new user writes it)."""
    from plugtune.testing import load_shared_tokenizer

    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    tok = load_shared_tokenizer("llama2")
    base = work / "models" / "tiny"
    make_tiny_llama(len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": p[8:11][::-1]}) + "\n"
                            for p in PROMPTS * 4))
    monkeypatch.chdir(work)
    torch.set_num_threads(1)
    recipe = validate_recipe(dict(
        base_model="models/tiny", adapter=adapter, chat_template=chat_template,
        lora_target_modules="all-linear", datasets=[dict(path="train.jsonl", type="prompt_completion")],
        sequence_len=64, micro_batch_size=4, max_steps=2, learning_rate=1e-2, output_dir="runs/r1",
        report_to="none"))
    train(recipe)
    run = work / "runs" / "r1"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return run, base


def _snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def test_adapter_run_loads_from_anywhere(tmp_path, monkeypatch, make_tiny_llama):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, base = _train(tmp_path, monkeypatch, make_tiny_llama)
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base.resolve())
    tok = AutoTokenizer.from_pretrained(run)
    assert len(tok) > 32000  # chatml tokens were added: every loader below must resize
    ids = tok.apply_chat_template([{"role": "user", "content": "reverse abc ="}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ref = AutoPeftModelForCausalLM.from_pretrained(run)(**ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base)
        plain.resize_token_embeddings(len(tok))  # as the card's snippet does
        got = PeftModel.from_pretrained(plain, str(run))(**ids).logits
    torch.testing.assert_close(got, ref)  # the added rows come from the adapter, not the resize
    gen = json.loads((run / "generation_config.json").read_text())
    stops = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops and tok.eos_token_id in stops


def test_model_card_is_hub_metadata_and_its_snippet_runs(tmp_path, monkeypatch, make_tiny_llama):
    run, base = _train(tmp_path, monkeypatch, make_tiny_llama)
    card = (run / "README.md").read_text()
    meta = yaml.safe_load(card.split("---", 2)[1])
    assert "base_model" not in meta  # a local path is not a Hub id
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"plugtune", "lora", "sft"} <= set(meta["tags"])
    assert "<|im_start|>user" in card  # the prompt format
    code = _snippet(card)
    assert "resize_token_embeddings" in code
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "elsewhere", env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_generate_from_elsewhere_and_moved_base_is_named(tmp_path, monkeypatch, make_tiny_llama,
                                                         capsys):
    from plugtune.cli import main

    run, base = _train(tmp_path, monkeypatch, make_tiny_llama, chat_template="alpaca")
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run).peft_config  # no added tokens: plain load
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "reverse abc =", "--max-new-tokens", "3"]) == 0
    shutil.move(base, tmp_path / "moved")
    assert main(["generate", str(run), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "base model" in err and str(base.resolve()) in err


def test_hub_ids_are_kept_and_paths_resolved(tmp_path):
    from plugtune.export.portable import base_reference

    assert base_reference("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_reference("demo://tiny-llama") == "demo://tiny-llama"
    assert base_reference("./models/x") == str((tmp_path.cwd() / "models" / "x").resolve())


def test_chat_streams_multi_turn_from_stdin(tmp_path, monkeypatch, make_tiny_llama, capsys):
    import io

    from plugtune.chat import chat

    run, _ = _train(tmp_path, monkeypatch, make_tiny_llama, chat_template="chatml")
    out = io.StringIO()
    hist = chat(str(run), system="Be brief.", max_new_tokens=3,
                stdin=io.StringIO("reverse abc =\nreverse hello =\n/exit\nnever read\n"), stdout=out)
    assert [m["role"] for m in hist] == ["system", "user", "assistant", "user", "assistant"]
    assert hist[3]["content"] == "reverse hello ="
    assert out.getvalue().count("\n") >= 2  # each streamed answer ends its line
    from plugtune.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("reverse abc =\n"))  # piped stdin
    capsys.readouterr()
    assert main(["chat", str(run), "--max-new-tokens", "2", "--temperature", "0.7",
                 "--top-p", "0.9"]) == 0
    assert capsys.readouterr().out.endswith("\n")
