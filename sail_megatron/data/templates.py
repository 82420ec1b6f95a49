"""The chat templates a dataset can be rendered with (`data.template`), as data.

All three use Qwen's chatml tokens: a turn is `<|im_start|>{role}\\n{text}<|im_end|>`. They differ only in
what follows each `<|im_end|>` and in the system message used when neither the sample nor
`data.system_prompt` gives one; `ChatTemplate` renders every template from these two facts, so a template
is added here and nowhere else. The names are the ones checkpoints record in config.json (`template`),
and are listed in `config.data.TEMPLATES` too, where the config validates them (the config layer cannot
import this one).

Sources (upstream `conversation.py` registries; MPT style renders `system + sep`, then `role + text + sep`
per message, with `roles = ('<|im_start|>user\\n', '<|im_start|>assistant\\n')`):
  chatml       plain Qwen chatml, as this trainer always rendered it: a newline after every <|im_end|>
               and no default system message (InternVL's SeparatorStyle.CHATML with an empty system).
  sailvl-chat  what SAIL-VL checkpoints were trained with (their config.json: `template: sailvl-chat`;
               SAIL-VL-1.6's conversation.py registers it): MPT style with sep `<|im_end|>`, i.e. no newline
               between turns, and a Chinese default system message (the same string in ms-swift's SAIL-VL
               template, modelscope/ms-swift swift/template/templates/seed.py).
  univl-chat   SAIL-VL2's name for the same template (its config.json and conversation.py: identical
               system message, roles and separator; UniVL is the project's internal name).
  internvl2_5  InternVL 2.5 (OpenGVLab/InternVL, internvl_chat/internvl/conversation.py, `internvl2_5`):
               MPT style with sep `<|im_end|>\\n` and its own default system message.
`chat_template_jinja` writes each as the Jinja chat template a Hugging Face tokenizer applies (exports).
"""

import json
from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class TemplateSpec:
    name: str
    default_system: Optional[str]
    """System message when neither the sample nor data.system_prompt sets one; None: no system turn."""
    turn_end: str
    """Text after every <|im_end|> of a conversation ('\\n' in chatml, '' when turns abut)."""


TEMPLATES: Dict[str, TemplateSpec] = {
    spec.name: spec
    for spec in (
        TemplateSpec(name="chatml", default_system=None, turn_end="\n"),
        TemplateSpec(
            name="sailvl-chat",
            default_system="你是由抖音内容理解组开发的多模态大模型，英文名叫UniVL, 是一个有用无害的人工智能助手。",
            turn_end="",
        ),
        TemplateSpec(
            name="univl-chat",
            default_system="你是由抖音内容理解组开发的多模态大模型，英文名叫UniVL, 是一个有用无害的人工智能助手。",
            turn_end="",
        ),
        TemplateSpec(
            name="internvl2_5",
            default_system=(
                "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
            ),
            turn_end="\n",
        ),
    )
}

DEFAULT_TEMPLATE = "chatml"


def get_template(name: str) -> TemplateSpec:
    """The spec called `name`; a ValueError listing the known names otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; use one of {', '.join(TEMPLATES)}") from None


def chat_template_jinja(name: str, system_prompt: Optional[str] = None) -> str:
    """The Jinja chat template (`tokenizer.apply_chat_template`) that renders what `ChatTemplate` renders for
    template `name` and `data.system_prompt`, so an exported model is prompted as it was trained.

    The first system message replaces the default one (later ones are dropped, as in training); every other
    message is `<|im_start|>{role}\\n{content}<|im_end|>` plus the template's turn end. Content is a string (with
    `<image>` placeholders, as in the training data) or a list of parts: `{"type": "text", "text": ...}` as is,
    `{"type": "image"}` as `<image>\\n` (InternVL's convention). A processor replaces each `<image>` with the
    image block `<img><IMG_CONTEXT>*n</img>`. `add_generation_prompt` opens the assistant turn.
    """
    from sail_megatron.data.sample import IMAGE_PLACEHOLDER  # imported here: it imports megatron-energon
    from sail_megatron.data.tokenizer import IM_END, IM_START

    spec = get_template(name)
    system = spec.default_system if system_prompt is None else system_prompt

    def literal(text: str) -> str:  # a JSON string is a valid Jinja string literal
        return json.dumps(text, ensure_ascii=False)

    start, newline, end = literal(IM_START), literal("\n"), literal(IM_END + spec.turn_end)
    image, prompt = literal(IMAGE_PLACEHOLDER + "\n"), literal(IM_START + "assistant\n")
    return "".join(
        (
            "{%- macro render(content) -%}",
            "{%- if content is string -%}{{ content }}{%- else -%}{%- for part in content -%}",
            f"{{%- if part['type'] == 'image' -%}}{{{{ {image} }}}}",
            "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}",
            "{%- endfor -%}{%- endif -%}{%- endmacro -%}",
            f"{{%- set ns = namespace(system={literal(system or '')}, found=false) -%}}",
            "{%- for message in messages -%}{%- if message['role'] == 'system' and not ns.found -%}",
            "{%- set ns.system = render(message['content']) -%}{%- set ns.found = true -%}",
            "{%- endif -%}{%- endfor -%}",
            f"{{%- if ns.system -%}}{{{{ {start} + 'system' + {newline} + ns.system + {end} }}}}{{%- endif -%}}",
            "{%- for message in messages -%}{%- if message['role'] != 'system' -%}",
            f"{{{{ {start} + message['role'] + {newline} + render(message['content']) + {end} }}}}",
            "{%- endif -%}{%- endfor -%}",
            f"{{%- if add_generation_prompt -%}}{{{{ {prompt} }}}}{{%- endif -%}}",
        )
    )
