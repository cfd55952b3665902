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

# Llama 3 instruct layout (Meta's llama3 repo ``ChatFormat``): header tokens around the role,
# content trimmed, every turn closed by <|eot_id|>; the BOS is added by the tokenizer.
LLAMA3 = (
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen2.5 instruct: ChatML with Qwen's default system prompt when the conversation has none.
QWEN25 = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}" + CHATML
)

# Gemma: <start_of_turn>user / model turns closed by <end_of_turn>; a system turn is prepended
# to the first user turn (Gemma has no system role).
GEMMA = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{{ (sys if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Phi-3: <|role|> headers, turns closed by <|end|>.
PHI3 = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

TEMPLATES: dict[str, str] = {
    "alpaca": ALPACA,
    "llama2": LLAMA2,
    "mistral": MISTRAL,
    "chatml": CHATML,
    "zephyr": ZEPHYR,
    "plain": PLAIN,
    "llama3": LLAMA3,
    "qwen_25": QWEN25,
    "gemma": GEMMA,
    "phi_3": PHI3,
}

#: axolotl's ``chat_template`` names (``utils/schemas/enums.py`` ``ChatTemplate``) that are
#: plugtune templates under another name
ALIASES = {"mistral_v1": "mistral", "llama2_chat": "llama2"}
#: axolotl names whose template is the model's own (vision processors ship theirs):
#: ``tokenizer_default`` semantics, an error when the tokenizer has none
OWN_TEMPLATE = {"tokenizer_default", "tokenizer", "llama3_2_vision", "qwen2_vl", "llava",
                "pixtral", "gemma3", "gemma3n", "qwen3", "qwen3_5", "llama4"}

# Tokens a template needs in the vocabulary, added as special tokens if missing.
TEMPLATE_SPECIAL_TOKENS = {"chatml": ["<|im_start|>", "<|im_end|>"],
                           "qwen_25": ["<|im_start|>", "<|im_end|>"],
                           "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                           "gemma": ["<start_of_turn>", "<end_of_turn>"],
                           "phi_3": ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]}


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
        name: the recipe's ``chat_template``: a name in :data:`TEMPLATES` (axolotl's names
            ``chatml``, ``llama3``, ``qwen_25``, ``gemma``, ``phi_3``, ``alpaca``,
            ``mistral_v1`` included), ``"tokenizer"`` / ``"tokenizer_default"`` (or a name in
            :data:`OWN_TEMPLATE`) to insist on the tokenizer's own,
            ``"tokenizer_default_fallback_<name>"`` (the tokenizer's own, else ``<name>``), a
            literal Jinja string, or ``None`` (keep the tokenizer's own, else fall back to
            ``alpaca`` with a notice).

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
    if name.startswith("tokenizer_default_fallback_"):
        if getattr(tokenizer, "chat_template", None):
            return added
        name = name[len("tokenizer_default_fallback_"):]
    name = ALIASES.get(name, name)
    if name in OWN_TEMPLATE:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(f"chat_template: {name}, but the tokenizer ships no chat "
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
                        f"{', '.join(TEMPLATES)}, 'tokenizer_default', "
                        "'tokenizer_default_fallback_<name>', or a Jinja template string (axolotl "
                        "templates not listed are not bundled: use the model's own with "
                        "tokenizer_default, or pass its Jinja text)")
