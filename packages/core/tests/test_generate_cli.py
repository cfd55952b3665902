"""``plugtune generate`` sampling flags (``--temperature`` / ``--top-p``) reach every plugin's
``plugtune_generate`` through the run's ``recipe.generation``."""

from __future__ import annotations

import pytest

from plugtune.cli import main, with_sampling
from plugtune.config import load_recipe
from plugtune.train import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    recipe = load_recipe("demo", [f"output_dir={out}", "datasets.0.max_samples=32",
                                  "test_datasets.0.max_samples=4", "eval_before_training=false",
                                  "max_steps=2"])
    train(recipe)
    return out


def _generate(run, capsys, *flags):
    prompts = [f"reverse {w} =" for w in ("abcdef", "fedcba", "aabbcc", "cabbad")]
    argv = ["generate", str(run), "--max-new-tokens", "8"]
    for p in prompts:
        argv += ["--prompt", p]
    capsys.readouterr()
    assert main(argv + list(flags)) == 0
    return capsys.readouterr().out


def test_temperature_samples_and_zero_is_greedy(tiny_run, capsys):
    greedy = _generate(tiny_run, capsys)
    assert _generate(tiny_run, capsys, "--temperature", "0") == greedy
    import torch

    torch.manual_seed(0)
    sampled = [_generate(tiny_run, capsys, "--temperature", "5", "--top-p", "1.0") for _ in range(2)]
    assert any(s != greedy for s in sampled)  # an untrained model at T=5 does not repeat greedy


def test_with_sampling_updates_the_recipe_and_refuses_bad_values(tiny_run):
    from plugtune.runs import load_run_spec

    spec = load_run_spec(str(tiny_run))[0]
    s = with_sampling(spec, 0.7, 0.9)
    assert (s.recipe.generation.do_sample, s.recipe.generation.temperature,
            s.recipe.generation.top_p) == (True, 0.7, 0.9)
    assert spec.recipe.generation.do_sample is False  # the loaded spec is not mutated
    assert with_sampling(spec, 0, None).recipe.generation.do_sample is False
    with pytest.raises(SystemExit, match="temperature"):
        with_sampling(spec, -1, None)
    with pytest.raises(SystemExit, match="top-p"):
        with_sampling(spec, None, 1.5)
