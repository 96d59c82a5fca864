"""The last leaks in the data: PII written with HTML character references and bare cloud secret keys are caught
wherever text is stored (the cleaned examples, a dropped example's quarantine copy, any quarantined raw record),
and the key-shaped rule leaves hex digests, identifiers and paths alone."""

from __future__ import annotations

import pytest

from ftops.data.clean import clean, find_pii, quarantined, redact
from ftops.data.records import Batch, Example

KEY = "ASQWb2RtGd9Vjl7XTT3LCXO3v46xPzq2+tyy9oEo"  # random, shaped like an AWS secret access key
LEAKY = f"Write to john&#64;example.com or j&amp;#x40;acme-corp.io; the key is {KEY}."


def _example(text: str) -> Example:
    return Example(
        messages=[{"role": "user", "content": text}, {"role": "assistant", "content": "Noted."}], source="f", line=1
    )


def test_character_references_and_bare_keys_never_reach_the_training_text():
    batch = clean(Batch(examples=[_example(LEAKY)]), "redact")
    text = batch.examples[0].messages[0]["content"]
    assert "john" not in text and "acme-corp" not in text and KEY not in text, text
    assert text.count("[EMAIL]") == 2 and "[SECRET]" in text and batch.pii == {"EMAIL": 2, "SECRET": 1}


def test_nor_the_quarantine():
    dropped = clean(Batch(examples=[_example(LEAKY)]), "drop").quarantine[0].raw
    raw = quarantined("f", 2, "invalid_role", "bad role", f'{{"messages": "{LEAKY}"}}').raw  # not cleaned first
    for stored in (dropped, raw):
        assert "john" not in stored and "acme-corp" not in stored and KEY not in stored, stored


def test_spans_point_into_the_text_as_written():
    text = "Mail maria&#64;northwind.com today"
    [(kind, start, end)] = find_pii(text)
    assert kind == "EMAIL" and text[start:end] == "maria&#64;northwind.com"
    assert redact(text)[0] == "Mail [EMAIL] today"


@pytest.mark.parametrize(
    "text",
    [
        "Commit f2f7324865a6973a26669cc2dc1be36114908557 fixed it.",  # SHA-1, lower case
        "Tree 9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B matches.",  # SHA-1, upper case
        "The class AbstractSingletonProxyFactoryBean2Helper is deprecated.",
        "Open src/main/java/com/acme/billing/InvoiceService.java now.",
        "AT&amp;T and Barnes &amp; Noble, &lt;b&gt;bold&lt;/b&gt;",
        "Part of a longer token: abcDEF0123456789abcDEF0123456789abcDEF0123456789xyz",
    ],
)
def test_key_shaped_hard_negatives_left_alone(text):
    assert redact(text) == (text, {})
