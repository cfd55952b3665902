"""``plugtune prepare`` on a seq2seq recipe: the trained labels it shows are the target, and text
the T5 tokenizer cannot represent (``{``, ``}``, newlines) is reported with counts."""

from __future__ import annotations

import json
import logging

import yaml

from plugtune.cli import main


def test_prepare_shows_seq2seq_targets_and_warns_on_unknown_tokens(tmp_path, tiny_dir, capsys, caplog):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"source": f"Amanda baked {i} cookies.",
                                          "target": "Amanda baked {cookies}.\nBye"})
                              for i in range(2)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base_model": str(tiny_dir), "sequence_len": 64,
                                      "datasets": [{"path": str(data), "type": "seq2seq"}]}))
    with caplog.at_level(logging.WARNING):
        assert main(["prepare", str(recipe), "--show", "1"]) == 0
    out = capsys.readouterr().out
    labels = out.split("trained labels")[1]
    assert "Amanda baked <unk>cookies<unk>. Bye</s>" in labels
    assert "unk_label_tokens" in out
    assert "4 trained label tokens in 2 samples are the unknown token" in caplog.text
