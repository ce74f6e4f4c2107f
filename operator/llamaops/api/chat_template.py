"""Chat templates that serve the system prompt an adapter was trained with.

The trainer (llamaops_trainer.data.to_messages) puts the run's systemPrompt in
front of every conversation that has no system message, then renders it with
the model's chat template. Serving must build the same prompt for the same
messages, byte for byte, or the adapter sees a prompt it never learned from.
vLLM's `--chat-template` replaces the tokenizer's template, so the served
template is the same rule written in Jinja followed by the model's template:

    {% if no system message %}{% set messages = [system] + messages %}{% endif %}
    <the Llama 3.x template>

The Llama 3.x templates here render what the published ones render for
text conversations (system, user, assistant turns; tool results as ipython
turns): Meta-Llama-3 for family 3, the 3.1 template (also 3.2's and 3.3's) for
the others, with the date the trainer fixes (DATE_STRING, which the trainer's
TEMPLATE_KWARGS passes) as the default, so the system block does not change
from one day to the next.
Pure: no Kubernetes, no tokenizer.
"""

from __future__ import annotations

import json

from llamaops.api import catalog

# The date the trainer passes as date_string (llamaops_trainer.data.TEMPLATE_KWARGS is built from it).
DATE_STRING = "26 Jul 2024"

# Meta-Llama-3-*-Instruct's template (also the tiny test model's, llamaops_trainer.tiny). Not the trainer's
# fallback for tokenizers without a template (llamaops_trainer.data.LLAMA3_CHAT_TEMPLATE): that one writes
# bos_token even for an empty conversation, so both render the same only for conversations with a message.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama 3.1 / 3.2 / 3.3 Instruct, text conversations: a system block with the knowledge
# cut-off and the date always comes first; the system message (if any) goes inside it.
LLAMA31_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}{%- set date_string = \"" + DATE_STRING + "\" %}{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] == 'tool' or message['role'] == 'ipython' %}\n"
    "        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n"
    "        {%- if message['content'] is mapping or message['content'] is iterable %}\n"
    "            {{- message['content'] | tojson }}\n"
    "        {%- else %}\n"
    "            {{- message['content'] }}\n"
    "        {%- endif %}\n"
    "        {{- \"<|eot_id|>\" }}\n"
    "    {%- else %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)


def base_template(base_model: str) -> str:
    """The Llama 3.x template of a base model (Llama 3's for models the catalog does not know)."""
    model = catalog.lookup(base_model)
    if model is not None and model.family != "3":
        return LLAMA31_TEMPLATE
    return LLAMA3_TEMPLATE


def jinja_string(value: str) -> str:
    """`value` as a Jinja string literal, safe whatever it contains.

    Jinja decodes literals with Python's unicode-escape after escaping non-ASCII
    characters, so JSON's escapes work; braces, percent and hash are escaped too,
    so no `%}`, `}}` or `#}` inside the prompt can end the tag.
    """
    literal = json.dumps(value, ensure_ascii=False)
    for ch in "{}%#":
        literal = literal.replace(ch, f"\\x{ord(ch):02x}")
    return literal


def with_system_prompt(system_prompt: str, template: str) -> str:
    """`template` with `system_prompt` as the system message of conversations that have none (the trainer's rule)."""
    # No text between the tags: the output is the same with or without trim_blocks.
    return (
        "{#- LlamaOps: the system prompt the adapter was trained with, unless the request sends one. -#}"
        f"{{%- set llamaops_default_system = {jinja_string(system_prompt)} -%}}"
        "{%- if messages | length == 0 or messages[0]['role'] != 'system' -%}"
        "{%- set messages = [{'role': 'system', 'content': llamaops_default_system}] + messages -%}"
        "{%- endif -%}"
        + template
    )


def served_template(base_model: str, system_prompt: str) -> str:
    return with_system_prompt(system_prompt, base_template(base_model))


# The same templates for Ollama (Go text/template over Ollama's .Messages and .System; Ollama adds the BOS
# token itself when the model's tokenizer says so). Ollama does not trim message contents as the Jinja
# templates do: a message with leading or trailing whitespace renders with it.
OLLAMA_LLAMA3_TEMPLATE = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>\n"
    "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
OLLAMA_LLAMA31_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\n"
    "Today Date: " + DATE_STRING + "\n\n"
    "{{ if .System }}{{ .System }}{{ end }}<|eot_id|>\n"
    "{{- range .Messages }}{{- if ne .Role \"system\" }}<|start_header_id|>"
    "{{ if eq .Role \"tool\" }}ipython{{ else }}{{ .Role }}{{ end }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>\n"
    "{{- end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
# What ends a turn in both: Ollama stops generating there.
OLLAMA_STOP_TOKENS = ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")


def ollama_template(base_model: str) -> str:
    """base_template(base_model), as an Ollama TEMPLATE."""
    return OLLAMA_LLAMA3_TEMPLATE if base_template(base_model) == LLAMA3_TEMPLATE else OLLAMA_LLAMA31_TEMPLATE
