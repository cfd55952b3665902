"""Reasoning fields and the ``developer`` role in chat records (formats)."""

from __future__ import annotations

import pytest

from plugtune.data.formats import BadRecord, messages


def _rec(turn_extra: dict, role: str = "system") -> dict:
    return {"messages": [{"role": role, "content": "Be brief."},
                         {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4", **turn_extra}]}


@pytest.mark.parametrize("extra,expected", [
    ({"reasoning_content": "Add."}, "Add."),
    ({"thinking": "Add."}, "Add."),  # Hugging Face's gpt-oss template key
    ({"reasoning": "Add."}, "Add."),
    ({"reasoning_content": "First.", "thinking": "Second."}, "First."),  # first key wins
    ({"thinking": "  "}, None),  # blank: no reasoning
    ({}, None),
])
def test_reasoning_keys_become_reasoning_content(extra, expected):
    out = messages(_rec(extra), {})["messages"][-1]
    assert out.get("reasoning_content") == expected
    assert "thinking" not in out and "reasoning" not in out


def test_reasoning_on_a_user_turn_is_ignored():
    rec = _rec({})
    rec["messages"][1]["thinking"] = "not an answer's"
    assert "reasoning_content" not in messages(rec, {})["messages"][1]


@pytest.mark.parametrize("key", ["reasoning_content", "thinking", "reasoning"])
def test_reasoning_that_is_not_a_string_names_the_field(key):
    with pytest.raises(BadRecord, match=rf"messages\[2\]\.{key}.: expected a string, got dict"):
        messages(_rec({key: {"text": "x"}}), {})


def test_developer_role_is_a_system_turn():
    out = messages(_rec({}, role="developer"), {})["messages"]
    assert out[0] == {"role": "system", "content": "Be brief."}
