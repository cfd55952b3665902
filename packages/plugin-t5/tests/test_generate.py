"""Generation honours max_new_tokens (not GenerationConfig's 20) and encodes the user content."""

from __future__ import annotations

import pytest

from plugtune.testing import make_spec
from plugtune_t5._generate import generate_ids, source_text
from plugtune_t5.tiny import tiny_t5

DIALOGUE = "Hannah: Hey, do you have Betty's number?\nAmanda: Lemme check\nAmanda: Sorry, can't find it."


@pytest.fixture
def no_stop_model(t5_tokenizer):
    """A random tiny T5 that may not emit EOS/pad/sentinels, so only the length limit stops it."""
    model = tiny_t5()
    model.generation_config.suppress_tokens = list(t5_tokenizer.all_special_ids)
    return model


def test_the_library_default_would_stop_at_20(no_stop_model, t5_tokenizer):
    """What the hook must beat: plain generate() stops after ~20 tokens."""
    enc = t5_tokenizer([DIALOGUE], return_tensors="pt")
    with pytest.warns(UserWarning, match="max_length"):
        out = no_stop_model.generate(**enc)
    assert out.shape[1] <= 21


def test_length_is_max_new_tokens(no_stop_model, t5_tokenizer):
    for n in (5, 40):
        ids = generate_ids(no_stop_model, t5_tokenizer, [DIALOGUE, "Tom: late\nAnna: ok"], n)
        assert [len(x) for x in ids] == [n, n]


def test_hook_output_grows_with_max_new_tokens(no_stop_model, t5_tokenizer):
    spec, pm = make_spec("t5")
    gen = pm.hook.plugtune_generate
    short = gen(spec=spec, model=no_stop_model, tokenizer=t5_tokenizer, prompts=[DIALOGUE],
                max_new_tokens=8, images=None)
    long = gen(spec=spec, model=no_stop_model, tokenizer=t5_tokenizer, prompts=[DIALOGUE],
               max_new_tokens=48, images=None)
    assert long[0].startswith(short[0]) and len(long[0]) > len(short[0])
    n_tokens = len(t5_tokenizer(long[0], add_special_tokens=False)["input_ids"])
    assert n_tokens > 20, f"generation stopped near the default max_length: {n_tokens} tokens"


def test_message_prompts_use_the_user_content(t5_tokenizer):
    spec, pm = make_spec("t5")
    model = tiny_t5()
    model.train()
    msgs = [{"role": "user", "content": DIALOGUE}]
    kw = dict(spec=spec, model=model, tokenizer=t5_tokenizer, max_new_tokens=12, images=None)
    as_text = pm.hook.plugtune_generate(prompts=[DIALOGUE], **kw)
    as_msgs = pm.hook.plugtune_generate(prompts=[msgs], **kw)
    assert as_text == as_msgs and len(as_text) == 1
    assert model.training, "generation must restore training mode"
    assert source_text([{"role": "system", "content": "Summarize."}, *msgs]) == "Summarize.\n\n" + DIALOGUE
    with pytest.raises(ValueError, match="no user content"):
        source_text([{"role": "assistant", "content": "x"}])
