"""Named chat templates for base models that ship none.

Each template is a Jinja chat template (the format ``tokenizer.apply_chat_template`` reads), so
one code path renders every model, and the template is saved with the tokenizer into the run
directory, where ``plugtune generate`` finds it. Templates end every assistant turn with the
EOS (or the template's end-of-turn token) so the model learns to stop.

Every sequence carries exactly one BOS (added by the tokenizer or the template, never both):
the ``llama2`` template therefore separates later turns with a space instead of Meta's extra
``<s>``.

Sources: Alpaca (tatsu-lab/stanford_alpaca ``PROMPT_DICT``), Llama 2 chat (Meta's
``llama`` repo ``chat_completion``), ChatML (OpenAI / Qwen), Zephyr
(HuggingFaceH4/zephyr-7b-beta ``tokenizer_config.json``), Mistral instruct (``[INST]``).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

ALPACA = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set sys = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}"
    "{% if m['role'] == 'user' %}{% if loop.index0 > 0 %} {% endif %}"
    "[INST] {{ (sys if loop.first else '') + m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)

MISTRAL = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ZEPHYR = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Plain completion: the user text followed directly by the answer (demo, raw prompt/answer data).
PLAIN = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
)

TEMPLATES: dict[str, str] = {
    "alpaca": ALPACA,
    "llama2": LLAMA2,
    "mistral": MISTRAL,
    "chatml": CHATML,
    "zephyr": ZEPHYR,
    "plain": PLAIN,
}

# Tokens a template needs in the vocabulary, added as special tokens if missing.
TEMPLATE_SPECIAL_TOKENS = {"chatml": ["<|im_start|>", "<|im_end|>"]}


class TemplateError(ValueError):
    """No chat template could be chosen for a tokenizer."""


def ensure_chat_template(tokenizer, name: str | None) -> list[str]:
    """Make sure ``tokenizer.chat_template`` is set.

    Args:
        tokenizer: a ``transformers`` tokenizer (modified in place).
        name: the recipe's ``chat_template``: a name in :data:`TEMPLATES`, ``"tokenizer"`` to
            insist on the tokenizer's own, a literal Jinja string, or ``None`` (keep the
            tokenizer's own, else fall back to ``alpaca`` with a notice).

    Returns:
        Special tokens added to the vocabulary (the caller must resize embeddings).

    Raises:
        TemplateError: ``"tokenizer"`` was asked for but the tokenizer has none, or an unknown
            name was given.
    """
    added: list[str] = []
    if name is None:
        if getattr(tokenizer, "chat_template", None):
            return added
        log.info("tokenizer has no chat template; using the 'alpaca' template "
                 "(set chat_template: in the recipe to choose)")
        name = "alpaca"
    if name == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("chat_template: tokenizer, but the tokenizer ships no chat "
                                f"template; choose one of {', '.join(TEMPLATES)}")
        return added
    if name in TEMPLATES:
        tokenizer.chat_template = TEMPLATES[name]
        from plugtune.token_rows import add_tokens

        return add_tokens(tokenizer, TEMPLATE_SPECIAL_TOKENS.get(name, []))
    if "{%" in name or "{{" in name:
        tokenizer.chat_template = name
        return added
    raise TemplateError(f"chat_template: unknown template {name!r}; expected one of "
                        f"{', '.join(TEMPLATES)}, 'tokenizer', or a Jinja template string")
