"""Ollama ``Modelfile`` for an exported GGUF: ``FROM``, ``TEMPLATE`` (Go template), ``SYSTEM``
and one ``PARAMETER stop`` per stop token (EOS and the end-of-turn token).

Ollama renders prompts with Go templates, not Jinja: each named plugtune template has a Go twin
here that renders the same text (the BOS is not in it: llama.cpp adds it from the GGUF's
``tokenizer.ggml.add_bos_token``). A tokenizer's own ChatML-style template maps to the ChatML
twin; any other template leaves ``TEMPLATE`` out, and Ollama falls back to the chat template
stored in the GGUF. Syntax: https://github.com/ollama/ollama/blob/main/docs/modelfile.md
"""

from __future__ import annotations

from plugtune.data.templates import ALPACA_PREAMBLE, template_name

_RANGE = "{{- range $i, $m := .Messages }}"

GO_TEMPLATES = {
    "chatml": (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        + _RANGE + "{{- if ne $m.Role \"system\" }}<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n"
        "{{ end }}{{- end }}<|im_start|>assistant\n"),
    "alpaca": (
        "{{- if .System }}{{ .System }}{{ else }}" + ALPACA_PREAMBLE + "{{ end }}\n\n"
        + _RANGE + "{{- if eq $m.Role \"user\" }}{{ if $i }}\n\n{{ end }}### Instruction:\n"
        "{{ $m.Content }}\n\n{{ else if eq $m.Role \"assistant\" }}### Response:\n{{ $m.Content }}"
        "{{ end }}{{- end }}### Response:\n"),
    "zephyr": (
        "{{- if .System }}<|system|>\n{{ .System }}</s>\n{{ end }}"
        + _RANGE + "{{- if ne $m.Role \"system\" }}<|{{ $m.Role }}|>\n{{ $m.Content }}</s>\n{{ end }}"
        "{{- end }}<|assistant|>\n"),
    "mistral": (
        "{{- if .System }}{{ .System }}\n\n{{ end }}"
        + _RANGE + "{{- if eq $m.Role \"user\" }}[INST] {{ $m.Content }} [/INST]"
        "{{ else if eq $m.Role \"assistant\" }}{{ $m.Content }}</s>{{ end }}{{- end }}"),
    "llama2": (
        _RANGE + "{{- if eq $m.Role \"user\" }}{{ if $i }} {{ end }}[INST] "
        "{{ if and $.System (eq $i 0) }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}"
        "{{ $m.Content }} [/INST]{{ else if eq $m.Role \"assistant\" }} {{ $m.Content }} </s>"
        "{{ end }}{{- end }}"),
    "plain": (
        _RANGE + "{{- if eq $m.Role \"assistant\" }}{{ $m.Content }}</s>{{ else }}{{ $m.Content }}"
        "{{ end }}{{- end }}"),
}


def go_template(tokenizer) -> str | None:
    """The Go template matching the tokenizer's chat template, or ``None`` (none known)."""
    name = template_name(getattr(tokenizer, "chat_template", None))
    if name is None and "<|im_start|>" in (getattr(tokenizer, "chat_template", None) or ""):
        name = "chatml"
    return GO_TEMPLATES.get(name) if name else None


def modelfile(gguf_name: str, tokenizer, stop_ids: list[int], system: str | None = None,
              temperature: float | None = None) -> str:
    """The text of an Ollama ``Modelfile`` for ``gguf_name`` (a path relative to the Modelfile).

    Args:
        tokenizer: the exported tokenizer (chat template, special tokens).
        stop_ids: token ids that end a turn (EOS, end-of-turn); each becomes ``PARAMETER stop``.
        system: default system prompt (``SYSTEM``); omitted when ``None``.
    """
    lines = [f"FROM ./{gguf_name}", ""]
    tmpl = go_template(tokenizer)
    if tmpl is not None:
        lines += [f'TEMPLATE """{tmpl}"""', ""]
    else:
        lines += ["# TEMPLATE: none written; Ollama uses the chat template stored in the GGUF", ""]
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    for tid in dict.fromkeys(stop_ids):
        tok = tokenizer.convert_ids_to_tokens(int(tid))
        if tok:
            lines.append(f'PARAMETER stop "{tok}"')
    if temperature is not None:
        lines.append(f"PARAMETER temperature {temperature}")
    return "\n".join(lines) + "\n"
