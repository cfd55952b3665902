"""Named chat templates for base models that ship none.

Each template is a Jinja chat template (the format ``tokenizer.apply_chat_template`` reads), so
one code path renders every model, and the template is saved with the tokenizer into the run
directory, where ``plugtune generate`` finds it. Templates end every assistant turn with the
EOS (or the template's end-of-turn token) so the model learns to stop.

Every sequence carries exactly one BOS. A named template saved for a tokenizer that adds a BOS
(Llama, Mistral, Gemma) starts with ``{{ bos_token }}`` (:func:`ensure_chat_template`), so the
saved tokenizer's ``apply_chat_template(..., tokenize=True)`` (which adds no special tokens) gives
exactly the ids plugtune trained on. The ``llama2`` template separates later turns with a space
instead of Meta's extra ``<s>``.

Sources: Alpaca (tatsu-lab/stanford_alpaca ``PROMPT_DICT``, rendered as axolotl's
``AlpacaPrompter`` and LLaMA-Factory's ``alpaca`` template do: preamble, ``### Instruction:``,
``### Input:`` when there is one, ``### Response:``, answer, EOS), Llama 2 chat (Meta's
``llama`` repo ``chat_completion``), ChatML (OpenAI / Qwen), Zephyr
(HuggingFaceH4/zephyr-7b-beta ``tokenizer_config.json``), Mistral instruct (``[INST]``).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

#: Stanford Alpaca's two prompt preambles (tatsu-lab/stanford_alpaca ``PROMPT_DICT``), as
#: axolotl (``prompters.AlpacaPrompter``) renders them
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                         "provides further context. Write a response that appropriately completes "
                         "the request.")

# A user turn may carry the Alpaca ``input`` as its own key (the ``alpaca`` data format sets it,
# with ``content`` = instruction + "\n\n" + input for every other template): then the prompt is
# Stanford's with-input prompt, ``### Input:`` section included. A system turn replaces the
# preamble. Turns after the first are separated by a blank line; a response ends with EOS.
ALPACA = (
    "{% set ns = namespace(sys=none) %}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set ns.sys = messages[0]['content'] %}{% endif %}"
    "{% for m in messages %}"
    "{% set inp = m['input'] if m['input'] is defined and m['input'] else '' %}"
    "{% if m['role'] == 'user' %}"
    "{% if loop.index0 > (1 if ns.sys is not none else 0) %}\n\n{% endif %}"
    "{% if loop.index0 == (1 if ns.sys is not none else 0) %}"
    "{{ (ns.sys if ns.sys is not none else ('" + ALPACA_PREAMBLE_INPUT + "' if inp else '"
    + ALPACA_PREAMBLE + "')) + '\n\n' }}{% endif %}"
    "{% if inp and m['content'].endswith('\n\n' + inp) %}"
    "{{ '### Instruction:\n' + m['content'][:(m['content']|length) - (inp|length) - 2] + '\n\n### Input:\n' + inp + '\n\n' }}"
    "{% else %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}{% endif %}"
    "{% elif m['role'] == 'assistant' %}{{ '### Response:\n' + m['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
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


#: prefix of a named template saved for a tokenizer that adds a BOS itself
BOS_PREFIX = "{{ bos_token }}"


def template_name(chat_template: str | None) -> str | None:
    """The name in :data:`TEMPLATES` of a saved chat template (with or without
    :data:`BOS_PREFIX`), else ``None``."""
    if not chat_template:
        return None
    body = chat_template[len(BOS_PREFIX):] if chat_template.startswith(BOS_PREFIX) else chat_template
    return next((n for n, t in TEMPLATES.items() if t == body), None)


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
        from plugtune.data.tokenize import adds_bos
        from plugtune.token_rows import add_tokens

        # BOS in the template: apply_chat_template(tokenize=True) adds no special tokens
        tokenizer.chat_template = (BOS_PREFIX if adds_bos(tokenizer) else "") + TEMPLATES[name]
        return add_tokens(tokenizer, TEMPLATE_SPECIAL_TOKENS.get(name, []))
    if "{%" in name or "{{" in name:
        tokenizer.chat_template = name
        return added
    raise TemplateError(f"chat_template: unknown template {name!r}; expected one of "
                        f"{', '.join(TEMPLATES)}, 'tokenizer', or a Jinja template string")
