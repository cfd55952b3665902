"""The plugin contract test suite (in the style of ``langchain-tests``).

A plugin's tests subclass :class:`PluginContract` and set a few attributes; pytest then runs
every contract test against the plugin with a tiny random-weight model::

    from plugtune.testing import PluginContract

    class TestLlamaContract(PluginContract):
        plugin_name = "plugtune-llama"
        model_type = "llama"

        def make_model(self):            # tiny config, random weights
            ...
        def make_tokenizer(self):        # a real tokenizer from ../shared/data/tokenizers
            ...

The contract checks: the plugin is discoverable through the ``plugtune`` entry point, it claims
its model type (and no other plugin does), its target modules exist in the model, its collate
function is picklable, one train step gives a finite loss and non-zero gradients on the LoRA
adapter, and generation returns one string per prompt.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import torch

from plugtune.config import validate_recipe
from plugtune.plugins import get_plugin_manager, resolve_family
from plugtune.spec import ModelSpec


def shared_dir() -> Path:
    """``../shared`` beside the repository (or ``$PLUGTUNE_SHARED``); tests skip without it."""
    import os

    env = os.environ.get("PLUGTUNE_SHARED")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared" / "data"
        if cand.is_dir():
            return cand.parent
    return Path(os.getcwd()).parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ``../shared/data``; ``pytest.skip`` when it is absent."""
    p = shared_dir().joinpath("data", *parts)
    if not p.exists():
        import pytest  # lazily: pytest is only in the test extra (the tiny-model CLIs need none)

        pytest.skip(f"{p} not available (../shared/data is absent)")
    return p


# Special tokens of the real tokenizers in ../shared/data/tokenizers whose folder has only a
# converted tokenizer.json (no tokenizer_config.json): values from each model's official config.
_SPECIALS = {
    "llama2": dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True),
    "mistral_v1": dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True),
    "t5": dict(eos_token="</s>", unk_token="<unk>", pad_token="<pad>"),
    "falcon": dict(eos_token="<|endoftext|>", bos_token=None),
}


_TOKENIZER_DIRS: dict[str, Path] = {}


def _unpacked_tokenizer_dir(name: str) -> Path:
    """``../shared/data/tokenizers/<name>`` unpacked once per process into a temporary folder.

    The folder is removed when the interpreter exits (``atexit``), so a test session leaves
    nothing behind in ``$TMPDIR`` (the Gemma 3 tokenizer alone is 33 MB unpacked).
    """
    import atexit
    import lzma
    import shutil
    import tempfile

    if name in _TOKENIZER_DIRS and _TOKENIZER_DIRS[name].is_dir():
        return _TOKENIZER_DIRS[name]
    src = shared_path("tokenizers", name)
    tmp = Path(tempfile.mkdtemp(prefix=f"plugtune-tok-{name}-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    for f in src.iterdir():
        if f.name.endswith(".xz"):
            (tmp / f.name[:-3]).write_bytes(lzma.decompress(f.read_bytes()))
        elif f.name == "tokenizer.converted.json":
            shutil.copy(f, tmp / "tokenizer.json")
        elif f.is_file():
            shutil.copy(f, tmp / f.name)
    _TOKENIZER_DIRS[name] = tmp
    return tmp


def plugin_name(module: str) -> str:
    """The name the plugin manager registers plugin ``module`` (``"plugtune_phi.plugin"``)
    under: its entry-point name when the package is installed (nox, CI), else ``module`` itself
    (loaded through ``PLUGTUNE_LOAD_PLUGINS=module`` from a source checkout)."""
    import importlib.metadata as md

    return next((ep.name for ep in md.entry_points(group="plugtune") if ep.value == module),
                module)


def load_shared_tokenizer(name: str):
    """A real tokenizer from ``../shared/data/tokenizers/<name>`` (skips when absent).

    Handles the layouts found there: ``tokenizer.json`` + ``tokenizer_config.json`` (xz
    compressed for qwen2_5 / llama3_2), a bare ``tokenizer.json`` (falcon) and sentencepiece
    models with a ``tokenizer.converted.json`` (llama2, mistral_v1, t5). Each call returns a
    fresh tokenizer object (tests may add tokens); the unpacked files are shared per process.

    Raises:
        FileNotFoundError: the folder has no ``tokenizer.json``.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tmp = _unpacked_tokenizer_dir(name)
    if (tmp / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(tmp)
    if (tmp / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tmp / "tokenizer.json"),
                                      **_SPECIALS.get(name, {}))
        return tok
    raise FileNotFoundError(f"no tokenizer.json in {shared_path('tokenizers', name)}")


def make_spec(model_type: str, path: str = "tiny", pm=None, **recipe: Any) -> tuple[ModelSpec, Any]:
    """A :class:`ModelSpec` for an in-memory tiny model, routed through the plugin manager."""
    pm = pm or get_plugin_manager()
    route = resolve_family(pm, model_type)
    data = {"base_model": path, "datasets": [{"path": "unused.jsonl", "type": "alpaca"}],
            "adapter": "lora", **recipe}
    rec = validate_recipe(data)
    return ModelSpec(path=path, model_type=model_type, family=route.family, plugin=route.plugin,
                     recipe=rec, torch_dtype=torch.float32, quantization=rec.quantization), pm


def run_bundled_recipe(name: str, base_model, out_dir: Path, cwd: Path, *sets: str,
                       needs: str = "dolly") -> tuple[str, dict]:
    """``plugtune train NAME --set base_model=... --set max_steps=2 --set output_dir=...
    [--set ...]`` in a subprocess, from ``cwd`` (the bundled recipes' data paths are relative
    to the repository root, ``../shared/data`` beside it).

    Skips when ``cwd/../shared/data/<needs>`` is absent; fails with the stderr tail when the
    command does. Returns ``(stdout, metrics.json of the run)``.
    """
    import json
    import subprocess
    import sys

    if not (cwd.parent / "shared" / "data" / needs).is_dir():
        import pytest

        pytest.skip("../shared/data beside the repository is absent")
    cmd = [sys.executable, "-m", "plugtune", "train", name, "--set", f"base_model={base_model}",
           "--set", "max_steps=2", "--set", f"output_dir={out_dir}"]
    for kv in sets:
        cmd += ["--set", kv]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout, json.loads((out_dir / "metrics.json").read_text())


def packed_and_unpacked_loss(pm, spec, model, tokenizer, samples: list[list[int]],
                             capacity: int) -> tuple[float, float]:
    """The train-step loss of ``samples`` (token id lists, every token trained but each first)
    packed into one row of ``capacity`` tokens, and of the same samples padded one per row,
    both normalised by the same label count (no grad). Equal losses = no attention across
    packed samples through the plugin's load/collate/train-step hooks."""
    from plugtune.data.packing import pack_rows

    collate = pm.hook.plugtune_collate(spec=spec, tokenizer=tokenizer)
    rows = pack_rows(samples, samples, capacity)
    packed = collate([{k: v[0] for k, v in rows.items()}])
    unpacked = collate([{"input_ids": s, "labels": [-100, *s[1:]]} for s in samples])
    n = int((unpacked["labels"] != -100).sum())
    with torch.no_grad():
        lp, lu = (float(pm.hook.plugtune_train_step(spec=spec, model=model, batch=x,
                                                    num_items_in_batch=n))
                  for x in (packed, unpacked))
    return lp, lu


CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."}]


def _fixture(fn):
    """``pytest.fixture(fn)``; ``fn`` unchanged where pytest is not installed (a plain install
    imports this module for the tiny-model helpers, e.g. ``python -m plugtune_llama.tiny``)."""
    try:
        import pytest
    except ImportError:
        return fn
    return pytest.fixture(fn)


class PluginContract:
    """Subclass in a plugin's tests; set :attr:`plugin_name`, :attr:`model_type` and implement
    :meth:`make_model` / :meth:`make_tokenizer`."""

    plugin_name: str = ""
    model_type: str = ""
    #: extra recipe keys for the spec (e.g. ``{"chat_template": "chatml"}``)
    recipe: dict = {}
    #: a folder of ``../shared/data/tokenizers`` for the default :meth:`make_tokenizer`
    tokenizer_name: str = ""

    # -- to implement -------------------------------------------------------------------------
    def make_model(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def make_tokenizer(self):
        """The real tokenizer :attr:`tokenizer_name`, loaded once per contract class."""
        if not self.tokenizer_name:  # pragma: no cover - abstract
            raise NotImplementedError("set tokenizer_name or override make_tokenizer")
        cache = type(self).__dict__.get("_tokenizer_cache")
        if cache is None:
            cache = load_shared_tokenizer(self.tokenizer_name)
            type(self)._tokenizer_cache = cache
        return cache

    def make_processor(self, tokenizer):
        """The ``Loaded.processor`` handed to collate/generate (vision families); ``None`` for
        text families. Built once per test from the tokenizer of :meth:`make_tokenizer`."""
        return None

    def sample_features(self, spec, tokenizer) -> list[dict]:
        """Two tokenized training features (override for vision or seq2seq families)."""
        from plugtune.data.templates import ensure_chat_template
        from plugtune.data.tokenize import probe_template, tokenize_chat, tokenize_seq2seq

        if spec.task == "seq2seq":
            return [tokenize_seq2seq(tokenizer, "Summarize: the cat sat on the mat.", "cat sat", 64),
                    tokenize_seq2seq(tokenizer, "Summarize: dogs bark loudly at night.", "dogs bark", 64)]
        ensure_chat_template(tokenizer, spec.recipe.chat_template)
        info = probe_template(tokenizer)
        short = [CHAT[0], {"role": "assistant", "content": "Paris."}]
        return [tokenize_chat(tokenizer, m, info, 128) for m in (CHAT, short)]

    # -- fixtures -----------------------------------------------------------------------------
    @_fixture
    def setup(self):
        torch.manual_seed(0)
        spec, pm = make_spec(self.model_type, **self.recipe)
        tok = self.make_tokenizer()
        model = self.make_model()
        return spec, pm, model, tok

    def _lora(self, spec, pm, model):
        from peft import LoraConfig, TaskType, get_peft_model

        from plugtune.moe import resolve_targets

        targets = pm.hook.plugtune_target_modules(spec=spec, model=model, method="auto")
        targets = resolve_targets(model, targets)  # MoE: exact modules, as training uses them
        task = TaskType.SEQ_2_SEQ_LM if spec.task == "seq2seq" else TaskType.CAUSAL_LM
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                task_type=task, lora_dropout=0.0))

    # -- the contract -------------------------------------------------------------------------
    def test_discoverable(self):
        pm = get_plugin_manager()
        assert pm.has_plugin(self.plugin_name), (
            f"{self.plugin_name} is not registered through the 'plugtune' entry-point group; "
            f"registered: {[n for n, _ in pm.list_name_plugin()]}")

    def test_claims_its_model_type(self):
        pm = get_plugin_manager()
        route = resolve_family(pm, self.model_type)
        assert route.plugin == self.plugin_name
        plugin = pm.get_plugin(self.plugin_name)
        for fam in plugin.plugtune_families():
            assert fam.model_types, f"family {fam.name} claims no model type"
            assert fam.task in ("causal", "seq2seq", "vision")

    def test_target_modules_exist(self, setup):
        spec, pm, model, tok = setup
        for method in ("auto", "all-linear"):
            targets = pm.hook.plugtune_target_modules(spec=spec, model=model, method=method)
            assert targets, f"no targets for {method}"
            if isinstance(targets, str):
                import re

                assert any(re.fullmatch(targets, n) for n, _ in model.named_modules())
                continue
            names = [n for n, _ in model.named_modules()]
            for t in targets:
                assert any(n == t or n.endswith("." + t) for n in names), f"{t} not in model"
            assert "lm_head" not in targets

    def test_collate_is_picklable(self, setup):
        spec, pm, model, tok = setup
        collate = pm.hook.plugtune_collate(spec=spec, tokenizer=tok,
                                           processor=self.make_processor(tok))
        again = pickle.loads(pickle.dumps(collate))
        feats = self.sample_features(spec, tok)
        a, b = collate(feats), again(feats)
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert torch.equal(a[k], b[k])
        assert (a["labels"] == -100).any(), "labels must be padded/masked with -100"

    def test_train_step_finite_loss_and_adapter_grads(self, setup):
        spec, pm, model, tok = setup
        model = self._lora(spec, pm, model)
        collate = pm.hook.plugtune_collate(spec=spec, tokenizer=tok,
                                           processor=self.make_processor(tok))
        batch = collate(self.sample_features(spec, tok))
        n = int((batch["labels"] != -100).sum())
        loss = pm.hook.plugtune_train_step(spec=spec, model=model, batch=batch, num_items_in_batch=n)
        assert loss is not None and math.isfinite(float(loss.detach()))
        loss.backward()
        grads = [p.grad for name, p in model.named_parameters() if "lora_" in name and p.requires_grad]
        assert grads, "no LoRA parameters"
        assert any(g is not None and g.abs().sum() > 0 for g in grads), "LoRA got no gradient"

    def test_generate_one_string_per_prompt(self, setup):
        spec, pm, model, tok = setup
        from plugtune.data.templates import ensure_chat_template

        if spec.task != "seq2seq":
            ensure_chat_template(tok, spec.recipe.chat_template)
        prompts = ["Hello there", "Name a colour."]
        outs = pm.hook.plugtune_generate(spec=spec, model=model, tokenizer=tok, prompts=prompts,
                                         max_new_tokens=4, images=None,
                                         processor=self.make_processor(tok))
        assert isinstance(outs, list) and len(outs) == len(prompts)
        assert all(isinstance(o, str) for o in outs)


def trained_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of consecutive trained token ids of one row (labels not ``-100``); asserts the
    labels are not shifted (a trained label equals its input id)."""
    spans: list[list[int]] = []
    cur: list[int] = []
    for t, lab in zip(ids, labels):
        if lab != -100:
            assert lab == t, "labels must not be shifted"
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


def force_next_token(model, token_id: int):
    """Replace ``model``'s output head by one that always predicts ``token_id`` (a biased
    ``nn.Linear`` with zero weights), to test where generation stops. Returns ``model``."""
    head = model.get_output_embeddings()
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.fill_(-10.0)
        new.bias[token_id] = 10.0
    model.set_output_embeddings(new.to(head.weight.device))
    return model
