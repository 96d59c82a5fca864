"""Clean: meaning-preserving text normalisation and PII detection (redact or drop, per customer).

Normalisation: HTML entities, Unicode NFC, line breaks (CRLF, CR, NEL, U+2028/U+2029 and the C0 separators
all become `\n`), control characters, runs of spaces and blank lines.
PII types: EMAIL, PHONE, SSN, CARD (Luhn-checked, with or without separators), IBAN (mod-97
checked), IP (v4 and v6), SECRET (cloud keys, tokens, private keys, `password=...`). Checksums keep
order numbers, dates and case numbers from being taken for cards or IBANs.
"""

from __future__ import annotations

import html
import re
import unicodedata

from ftops.records import Batch

_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f\u200b\u200e\u200f\ufeff]")
# Every code point Unicode or some reader treats as a line break: a break in meaning, so one `\n` in the text
_BREAK = re.compile(r"\r\n|[\r\x0b\x0c\x1c-\x1f\x85\u2028\u2029]")


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFC", html.unescape(text))
    text = _CONTROL.sub("", _BREAK.sub("\n", text))
    text = re.sub(r"[ \t\u00a0]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group())
    return 13 <= len(digits) <= 19 and _luhn(digits) and len(set(digits)) > 1


def _iban(m: re.Match) -> bool:
    s = m.group().replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    n = "".join(str(int(c, 36)) for c in s[4:] + s[:4])
    return int(n) % 97 == 1


# (type, pattern, extra check). Order matters: specific before generic (a card is not a phone).
DETECTORS: list[tuple[str, re.Pattern, object]] = [
    (
        "SECRET",
        re.compile(
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
            r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bsk-(?:proj-|live-|test-)?[A-Za-z0-9_-]{20,}|\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"
            r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b|\bgithub_pat_[A-Za-z0-9_]{22,}|\bnpm_[A-Za-z0-9]{36}\b|\bxox[abprs]-[A-Za-z0-9-]{10,}"
            r"|\bAIza[0-9A-Za-z_-]{35}\b|\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"
            # key = value, also with a prefix (DB_PASSWORD, aws_secret_access_key) or a quoted JSON key;
            # not a mask (********) or a template (<...>, ${...}, {{...}})
            r"|(?i:\b(?:[a-z0-9]{1,20}[_-]){0,3}(?:api[_-]?key|secret(?:[_-]access)?(?:[_-]key)?|access[_-]token|auth[_-]token"
            r"|password|passwd)\b[\"']?\s*[:=]\s*)[\"']?(?![*<]|\$\{|\{\{)[^\s\"',;]{8,}"
        ),
        None,
    ),
    # `@2x.png` is an image-name suffix, not a domain
    ("EMAIL", re.compile(r"\b[A-Za-z0-9._%+-]+@(?!\dx\.)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), None),
    # upper or lower case (typed by hand); the mod-97 check keeps the false-alarm rate low either way
    ("IBAN", re.compile(r"\b(?:[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}|[a-z]{2}\d{2}(?: ?[a-z0-9]){11,30})\b"), _iban),
    ("CARD", re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])"), _card),
    (
        "SSN",
        # 123-45-6789 or 123 45 6789 anywhere; nine bare digits only right after "SSN" / "social security number"
        re.compile(
            r"(?<![\w-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\w-]|[ .-]\d)"
            r"|(?i:\b(?:ssn|social security (?:number|no\.?))\b[\s#:.-]*)(?!000|666|9\d\d)\d{9}\b"
        ),
        None,
    ),
    (
        "IP",
        re.compile(
            r"(?<![\w.])(?:::ffff:)?(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])"
            r"|(?<![\w:])(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}(?![\w:])"
            r"|(?<![\w:])(?:[0-9a-fA-F]{1,4}:){1,6}:(?:[0-9a-fA-F]{1,4}:){0,5}[0-9a-fA-F]{1,4}(?![\w:])"
            r"|(?<![\w:])::1(?![\w:.])"
        ),
        None,
    ),
    (
        # NANP (area and exchange codes start 2-9); +country code; national numbers with a trunk 0 and one kind
        # of separator (UK, DE, FR) or a bracketed area code, (020) 7946 0404. 9 to 15 digits in all. Runs of bare
        # digit groups (4-4-4 tracking numbers, 2024-0115-0042 references) are not phones.
        "PHONE",
        re.compile(
            r"(?<![\w+/-])(?<!\d[ .-])(?:"
            r"(?:\+?1[ .-]?)?(?:\([2-9]\d{2}\)[ .-]?|[2-9]\d{2}[ .-])[2-9]\d{2}[ .-]\d{4}"
            r"|\+\d{1,3}(?:[ .-]?\(0\))?(?:[ .-]?(?:\(\d{1,4}\)|\d{1,5})){1,6}"
            r"|0\d{1,4}([ .-])\d{2,8}(?:\1\d{2,4}){0,3}|\(0\d{1,4}\) ?\d{3,8}(?:[ .-]\d{3,4})?"
            r")(?![\w/-]|[ .-]\d)"
        ),
        lambda m: 9 <= sum(c.isdigit() for c in m.group()) <= 15,
    ),
]


def find_pii(text: str) -> list[tuple[str, int, int]]:
    """Non-overlapping (type, start, end) spans, earlier detectors winning."""
    spans: list[tuple[str, int, int]] = []
    for kind, pattern, check in DETECTORS:
        for m in pattern.finditer(text):
            if check and not check(m):
                continue
            if any(s < m.end() and m.start() < e for _, s, e in spans):
                continue
            spans.append((kind, m.start(), m.end()))
    return sorted(spans, key=lambda s: s[1])


def redact(text: str) -> tuple[str, dict[str, int]]:
    counts: dict[str, int] = {}
    for kind, start, end in reversed(find_pii(text)):
        text = f"{text[:start]}[{kind}]{text[end:]}"
        counts[kind] = counts.get(kind, 0) + 1
    return text, counts


def clean(batch: Batch, policy: str = "redact") -> Batch:
    """Normalise every turn (and a preference pair's rejected answer) and apply the PII policy to all of them;
    dropped examples go to quarantine with reason `pii` (redacted there too)."""
    kept = []
    for ex in batch.examples:
        counts: dict[str, int] = {}
        texts = [m["content"] for m in ex.messages] + ([ex.rejected] if ex.rejected is not None else [])
        out = []
        for text in texts:
            content, found = redact(normalise(text))
            for k, v in found.items():
                counts[k] = counts.get(k, 0) + v
            out.append(content)
        for k, v in counts.items():
            batch.pii[k] = batch.pii.get(k, 0) + v
        if counts and policy == "drop":
            batch.drop(ex, "pii", ", ".join(f"{k}×{v}" for k, v in sorted(counts.items())))
            continue
        if any(not t for t in out):
            batch.drop(ex, "empty_content", "a turn is empty after normalisation")
            continue
        ex.messages = [{"role": m["role"], "content": c} for m, c in zip(ex.messages, out, strict=False)]
        if ex.rejected is not None:
            ex.rejected = out[-1]
        kept.append(ex)
    batch.examples = kept
    return batch
