from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from langchain_understudy.distill_jobs import redact as redact_module
from langchain_understudy.distill_jobs.redact import BUILTIN_KINDS, Redactor, redact_text
from langchain_understudy.errors import ConfigError


def test_all_is_pinned() -> None:
    assert redact_module.__all__ == ["BUILTIN_KINDS", "PiiMatch", "Redactor", "redact_text"]
    assert BUILTIN_KINDS == ("EMAIL", "IBAN", "CARD", "PHONE")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # emails
        ("mail jane.doe@example.com now", "mail <EMAIL> now"),
        ("first.last+tag@sub.example.co.uk.", "<EMAIL>."),
        ("<bob_99@mail-host.io>", "<<EMAIL>>"),
        # cards: Luhn-valid, printed the usual ways
        ("card 4111 1111 1111 1111 exp 12/27", "card <CARD> exp 12/27"),
        ("card 4111-1111-1111-1111.", "card <CARD>."),
        ("card 4111111111111111, thanks", "card <CARD>, thanks"),
        ("amex 3782 822463 10005", "amex <CARD>"),
        ("mc 5500 0000 0000 0004 / visa13 4222222222222", "mc <CARD> / visa13 <CARD>"),
        ("qty 2 4111 1111 1111 1111 done", "qty 2 <CARD> done"),
        # IBANs: mod-97 valid, with or without spaces, any case, next to other words
        ("IBAN DE89 3704 0044 0532 0130 00 please", "IBAN <IBAN> please"),
        ("to GB82WEST12345698765432.", "to <IBAN>."),
        ("iban gb82 west 1234 5698 7654 32 EUR", "iban <IBAN> EUR"),
        ("FR14 2004 1010 0505 0001 3M02 606", "<IBAN>"),
        # phones
        ("call +49 30 1234567 today", "call <PHONE> today"),
        ("Jane (jo@example.com, +49 30 1234567).", "Jane (<EMAIL>, <PHONE>)."),
        ("(tel. 030 12345678)", "(tel. <PHONE>)"),
        ("call +1 (555) 123-4567", "call <PHONE>"),
        ("call +44 (0)20 7946 0958 today", "call <PHONE> today"),
        ("(555) 123-4567 or 555.123.4567", "<PHONE> or <PHONE>"),
        ("555-123-4567 10 times", "<PHONE> 10 times"),
        ("030 12345678 / 020 7946 0958", "<PHONE> / <PHONE>"),
        ("06 12 34 56 78 and 0171/1234567", "<PHONE> and <PHONE>"),
        ("0049 30 12345678", "<PHONE>"),
    ],
)
def test_redacts(text: str, expected: str) -> None:
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        # order numbers and ids that look like cards but fail Luhn or the card grouping
        "order 4111111111111112 shipped",
        "order 4111-1111-1111-1112",
        "ref 1234567890123456",
        "order #12345678 and 1234567890123",
        "zero 0000 0000 0000 0000",
        # IBAN-shaped strings with a wrong checksum or an unknown country
        "GB82WEST12345698765433",
        "ZZ82WEST12345698765432",
        # dates, times, amounts, versions, addresses, ids
        "on 2024-01-15 at 12:30, 01/02/2024 and 15.01.2024",
        "ts 2024-01-15T12:30:45.123456+00:00",
        "price 1,299.00 USD, 1 000 000 users, pi 3.14159265358979",
        "v1.2.3 on 192.168.1.1:8080",
        "uuid 3f2a9c1e-4b6d-4e8f-9a0b-1c2d3e4f5a6b",
        "ORD-2024-000123 and INV 2023/0456, order #0012-3456-789",
        "+5 items, room 101, @mention, user@localhost",
    ],
)
def test_leaves_false_positives_alone(text: str) -> None:
    assert redact_text(text) == text


def test_find_reports_kinds_and_offsets() -> None:
    text = "jo@example.com paid with 4111 1111 1111 1111"
    found = Redactor().find(text)
    assert [(m.kind, m.text) for m in found] == [
        ("EMAIL", "jo@example.com"),
        ("CARD", "4111 1111 1111 1111"),
    ]
    assert all(text[m.start : m.end] == m.text for m in found)
    assert found[0].placeholder == "<EMAIL>"


def test_custom_patterns_and_builtin_subset() -> None:
    r = Redactor({"ticket": r"TCK-\d{6}", "Employee_ID": r"\bE\d{5}\b"}, builtins=["email"])
    assert r.kinds == ["EMAIL", "TICKET", "EMPLOYEE_ID"]
    out = r.redact("TCK-123456 by E12345 (e@x.org), card 4111 1111 1111 1111")
    assert out == "<TICKET> by <EMPLOYEE_ID> (<EMAIL>), card 4111 1111 1111 1111"


@pytest.mark.parametrize(
    ("patterns", "builtins", "needle"),
    [
        ({"bad name": "x"}, BUILTIN_KINDS, "letters, digits"),
        ({"ok": "(unclosed"}, BUILTIN_KINDS, "not a valid regular expression"),
        (None, ["EMAIL", "SSN"], "unknown built-in PII kind"),
    ],
)
def test_bad_configuration_says_what_to_do(
    patterns: dict[str, str] | None, builtins: list[str], needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        Redactor(patterns, builtins=builtins)


def test_redacts_messages_tool_calls_and_nested_values() -> None:
    r = Redactor()
    msgs = [
        HumanMessage([{"type": "text", "text": "I am jo@example.com"}]),
        AIMessage(
            "",
            tool_calls=[
                {"name": "lookup", "args": {"who": {"email": "jo@example.com"}}, "id": "c1"}
            ],
            additional_kwargs={
                "tool_calls": [
                    {"function": {"name": "lookup", "arguments": '{"email": "jo@example.com"}'}}
                ]
            },
        ),
        ToolMessage("phone +49 30 1234567", tool_call_id="c1"),
    ]
    out = r.redact_messages(msgs)
    assert out[0].content == [{"type": "text", "text": "I am <EMAIL>"}]
    assert isinstance(out[1], AIMessage)
    assert out[1].tool_calls[0]["args"] == {"who": {"email": "<EMAIL>"}}
    assert out[1].tool_calls[0]["id"] == "c1"
    fn = out[1].additional_kwargs["tool_calls"][0]["function"]
    assert fn["arguments"] == '{"email": "<EMAIL>"}'
    assert isinstance(out[2], ToolMessage)
    assert out[2].content == "phone <PHONE>" and out[2].tool_call_id == "c1"
    # the originals are untouched
    assert msgs[2].content == "phone +49 30 1234567"
    assert r.redact_value({"n": 3, "s": ["a@b.io"], "id": "a@b.io"}) == {
        "n": 3,
        "s": ["<EMAIL>"],
        "id": "a@b.io",
    }
