"""Chat templates rendered as transformers' apply_chat_template renders them: the fixtures'
expected text and token ids come from transformers itself (tools/make_hf_fixtures.py --chat)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxpd.errors import ConfigError
from jaxpd.tokenizer.chat_template import ChatTemplate, ChatTemplateError, find_template
from jaxpd.tokenizer.hf import HFTokenizer

CHAT = Path(__file__).resolve().parent / "fixtures" / "chat"
# the fixtures were rendered by transformers with the embedded model's tokenizer
TOKENIZER = Path(__file__).resolve().parents[1] / "jaxpd" / "assets" / "default_model"
CASES = [(folder.name, i, case) for folder in sorted(CHAT.iterdir()) if folder.is_dir()
         for i, case in enumerate(json.loads((folder / "expected.json").read_text())["cases"])]


@pytest.mark.parametrize("name, i, case", CASES, ids=[f"{n}-{i}" for n, i, _ in CASES])
def test_text_and_token_ids_equal_transformers(name, i, case):
    folder = CHAT / name
    template = ChatTemplate.for_checkpoint(folder)
    if case["error"] is not None:
        with pytest.raises(ChatTemplateError) as info:
            template.render(case["messages"], add_generation_prompt=case["add_generation_prompt"])
        assert str(info.value) == case["error"]
        return
    text = template.render(case["messages"], add_generation_prompt=case["add_generation_prompt"])
    assert text == case["text"]
    assert HFTokenizer(TOKENIZER).encode(text, add_special_tokens=False) == case["ids"]


def test_where_templates_come_from(tmp_path):
    assert find_template(None) is None
    assert find_template(tmp_path) is None  # no config, no file
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "  "}))
    assert find_template(tmp_path) is None
    override = tmp_path / "mine.jinja"
    override.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    template = ChatTemplate.for_checkpoint(CHAT / "chatml", override)
    assert template.render([{"role": "user", "content": "x"}]) == "<user>x"
    with pytest.raises(ConfigError, match="--chat-template: cannot read"):
        ChatTemplate.for_checkpoint(None, tmp_path / "missing.jinja")
    with pytest.raises(ConfigError, match="not a valid jinja2 template"):
        ChatTemplate("{% for %}")


def test_the_sandbox_refuses_what_a_hostile_template_or_message_tries():
    template = ChatTemplate("{{ messages[0].content.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError, match="cannot render"):
        template.render([{"role": "user", "content": "x"}])
    # message text is data: template syntax inside it is not evaluated
    plain = ChatTemplate("{{ messages[0]['content'] }}")
    assert plain.render([{"role": "user", "content": "{{ 7 * 7 }}"}]) == "{{ 7 * 7 }}"
    with pytest.raises(ChatTemplateError, match="cannot render"):
        ChatTemplate("{{ messages[3]['content'] }}").render([{"role": "user", "content": "x"}])
