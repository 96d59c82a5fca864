"""Clean: meaning-preserving text normalisation and PII detection (redact or drop, per customer).

Normalisation: HTML entities, Unicode NFC, line breaks (CRLF, CR, NEL, U+2028/U+2029 and the C0 separators
all become `\n`), control characters, runs of spaces and blank lines.
PII types: EMAIL, PHONE, SSN, CARD (Luhn-checked, with or without separators), IBAN (mod-97
checked), IP (v4 and v6), SECRET (cloud keys, tokens, private keys, `password=...`, a bare 40-character
secret key). Detection reads HTML character references decoded (`john&#64;example.com`), nested ones too. Checksums keep
order numbers, dates and case numbers from being taken for cards or IBANs.
"""

from __future__ import annotations

import html
import json
import math
import re
import unicodedata
from collections import Counter

from ftops.data.records import RAW_KEEP_CHARS, Batch, Example, Quarantined

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
    from stdnum import luhn

    return luhn.is_valid(digits)


def _card(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group())
    return 13 <= len(digits) <= 19 and _luhn(digits) and len(set(digits)) > 1


def _iban(m: re.Match) -> bool:
    """python-stdnum's IBAN check: mod 97 *and* the country's registered length and BBAN format (not the
    national check digits: some countries' published examples fail them)."""
    from stdnum import iban

    s = m.group().replace(" ", "").upper()
    return 15 <= len(s) <= 34 and iban.is_valid(s, check_country=False)


# (type, pattern, extra check, needles). Order matters: specific before generic (a card is not a phone). A
# detector with needles runs only on a text holding one of them (lower-cased): most texts hold no secret, and
# one long alternation tried at every position was most of the data stage's time.
def _secret(pattern: str, *needles: str) -> tuple[str, re.Pattern, None, tuple[str, ...]]:
    return ("SECRET", re.compile(pattern), None, needles)


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _bare_key(m: re.Match) -> bool:
    """A 40-character token shaped like a cloud secret key (AWS's secret access key) with no keyword beside it:
    mixed case and digits, random-looking (character entropy), not a path. Hex digests (git commits, SHA-1) are
    one case only; words, identifiers and paths have too little entropy or too many `/`."""
    s = m.group()
    upper = sum(c.isupper() for c in s)
    lower = sum(c.islower() for c in s)
    digits = sum(c.isdigit() for c in s)
    return upper >= 3 and lower >= 3 and digits >= 1 and s.count("/") < 4 and _entropy(s) >= 4.4


DETECTORS: list[tuple[str, re.Pattern, object, tuple[str, ...] | None]] = [
    # every PEM private-key block (RSA, EC, DSA, OPENSSH, ENCRYPTED, PGP ... BLOCK), to its end or the text's
    _secret(
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
        r"(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|$)",
        "-----begin",
    ),
    _secret(r"PuTTY-User-Key-File-\d+:[^\n]*(?:\n[^\n]*){0,20}?\nPrivate-Lines: \d+(?:\n[A-Za-z0-9+/=]+)+", "putty"),
    # platform tokens with a documented prefix
    _secret(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", "akia", "asia"),
    _secret(r"\bsk-(?:proj-|live-|test-|ant-)?[A-Za-z0-9_-]{20,}", "sk-"),
    _secret(r"\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}", "k_live_", "k_test_"),
    _secret(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b|\bgithub_pat_[A-Za-z0-9_]{22,}", "gh", "github_pat_"),
    _secret(r"\bglpat-[A-Za-z0-9_-]{20,}", "glpat-"),
    _secret(r"\bhf_[A-Za-z0-9]{30,}", "hf_"),
    _secret(r"\bSG\.[\w-]{16,}\.[\w-]{16,}", "sg."),
    _secret(r"\bshp(?:at|ss|ca|pa)_[a-fA-F0-9]{32}\b", "shp"),
    _secret(r"\bnpm_[A-Za-z0-9]{36}\b", "npm_"),
    _secret(r"\bxox[abprs]-[A-Za-z0-9-]{10,}", "xox"),
    _secret(r"\bSK[0-9a-fA-F]{32}\b", "sk"),
    _secret(r"\bya29\.[\w-]{20,}", "ya29."),
    _secret(r"\bAIza[0-9A-Za-z_-]{35}\b", "aiza"),
    _secret(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}", "eyj"),
    # webhook URLs: the URL is the credential
    _secret(
        r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[\w/-]{20,}"
        r"|https://(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/\d+/[\w-]{20,}"
        r"|https://[\w.-]+\.webhook\.office\.com/[\w/@.-]{20,}",
        "hooks.slack.com",
        "/api/webhooks/",
        ".webhook.office.com",
    ),
    # a connection string or URL with a password in it: scheme://user:password@host...
    _secret(r"\b[a-zA-Z][a-zA-Z0-9+.-]{1,20}://[^\s:/@'\"<>]+:[^\s@/'\"<>]{3,}@[^\s'\"<>]+", "://"),
    # bearer tokens (the token, not the word)
    _secret(r"(?<=\b[Bb]earer )[A-Za-z0-9._~+/-]{16,}=*", "bearer "),
    # an AWS-style 40-character secret key right after its name, even without `=`
    _secret(
        r"(?i:\b(?:secret|access)[ _-]?(?:access[ _-]?)?key\s+(?:is\s+|=\s*|:\s*)?)[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])",
        "key",
    ),
    # a bare 40-character secret key, no keyword (checked by _bare_key); not a chunk of a longer token, a URL-safe
    # token's part (`_`, `-`, `.` joined) or base64 with padding
    (
        "SECRET",
        re.compile(r"(?<![A-Za-z0-9/+=_.-])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=_-]|\.[A-Za-z0-9])"),
        _bare_key,
        None,
    ),
    # key = value, also with a prefix (DB_PASSWORD, aws_secret_access_key) or a quoted JSON key;
    # not a mask (********) or a template (<...>, ${...}, {{...}})
    _secret(
        r"(?i:\b(?:[a-z0-9]{1,20}[_-]){0,3}(?:api[_-]?key|secret(?:[_-]access)?(?:[_-]key)?|access[_-]token"
        r"|auth[_-]token|password|passwd|pwd|account[_-]?key|shared[_-]?access[_-]?key|client[_-]?secret)"
        r"\b[\"']?\s*[:=]\s*)[\"']?(?![*<]|\$\{|\{\{)[^\s\"',;]{8,}",
        "key",
        "secret",
        "token",
        "pass",
        "pwd",
    ),
    # Internationalised (Unicode letters in the local part and the domain) and full-width (＠ ．) forms too;
    # `@2x.png` is an image-name suffix, not a domain
    (
        "EMAIL",
        re.compile(
            r"(?<![\w.%+-])[\w.%+-]+[@＠](?!\dx\.)[\w-]+(?:[.．][\w-]+)*[.．](?:[^\W\d_]{2,}|xn--[\w-]+)(?![\w-])"
        ),
        None,
        ("@", "＠"),
    ),
    # upper or lower case (typed by hand); the mod-97 check keeps the false-alarm rate low either way
    ("IBAN", re.compile(r"\b(?:[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}|[a-z]{2}\d{2}(?: ?[a-z0-9]){11,30})\b"), _iban, None),
    ("CARD", re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])"), _card, None),
    (
        "SSN",
        # 123-45-6789 or 123 45 6789 anywhere; nine bare digits only right after "SSN" / "social security number"
        re.compile(
            r"(?<![\w-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\w-]|[ .-]\d)"
            r"|(?i:\b(?:ssn|social security (?:number|no\.?))\b[\s#:.-]*)(?!000|666|9\d\d)\d{9}\b"
        ),
        None,
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
            r"|(?:\+|00(?=[1-9]))\d{1,3}(?:[ .-]?\(0\))?(?:[ .-]?(?:\(\d{1,4}\)|\d{1,5})){1,6}"
            r"|0\d{1,4}([ .-])\d{2,8}(?:\1\d{2,4}){0,3}|\(0\d{1,4}\) ?\d{3,8}(?:[ .-]\d{3,4})?"
            r")(?![\w/-]|[ .-]\d)"
        ),
        lambda m: 9 <= sum(c.isdigit() for c in m.group()) <= 15,
        None,
    ),
]


_GROUP = re.compile(r"[^ -]+")
# Every needle, found in one pass (a lookahead, so needles that overlap are all seen)
_NEEDLES = re.compile(
    "(?=("
    + "|".join(re.escape(n) for n in sorted({n for d in DETECTORS for n in d[3] or ()}, key=len, reverse=True))
    + "))"
)


# How cards are written in groups: 4-4-4-4(-1..3), Amex 4-6-5, Diners 4-6-4; a sub-run of other groups
# (`112-3456789-1234567`, an order number) passing Luhn by chance (1 in 10) is not a card.
_CARD_GROUPS = re.compile(r"4,4,4,4(?:,[1-3])?|4,6,[45]|\d+")


def _shorter(kind: str, pattern: re.Pattern, check, m: re.Match) -> tuple[int, int] | None:
    """A match that fails its checksum may hold a valid shorter one (`ref 99 4111 1111 1111 1111`): the longest
    run of its space/dash-separated groups that matches the pattern on its own and passes the check."""
    text, base = m.group(), m.start()
    groups = [(g.start(), g.end()) for g in _GROUP.finditer(text)]
    if len(groups) > 8:  # bounded work per candidate: a card or IBAN is at most 8 groups, hostile text can be 19
        return None
    for size in range(len(groups) - 1, 0, -1):
        for i in range(len(groups) - size + 1):
            s, e = groups[i][0], groups[i + size - 1][1]
            if kind == "CARD":
                shape = ",".join(str(b - a) for a, b in groups[i : i + size])
                if not _CARD_GROUPS.fullmatch(shape):
                    continue
            sub = pattern.fullmatch(text[s:e])
            if sub and check(sub):
                return base + s, base + e
    return None


# An HTML character reference (`&#64;`, `&#x40;`, `&commat;`, with or without `;`)
_CHARREF = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});?")


def _decode_refs(text: str) -> tuple[str, list[int] | None, list[int] | None]:
    """`text` with its character references decoded, nested ones too (`&amp;#64;`, up to 3 levels), and for
    each character of the result the start and end of what it came from in `text` (None, None: nothing to decode)."""
    if "&" not in text or not _CHARREF.search(text):
        return text, None, None
    starts, ends = list(range(len(text))), list(range(1, len(text) + 1))
    for _ in range(3):
        out, new_starts, new_ends, pos = [], [], [], 0
        for m in _CHARREF.finditer(text):
            decoded = html.unescape(m.group())
            if decoded == m.group():
                continue
            out.append(text[pos : m.start()])
            new_starts += starts[pos : m.start()]
            new_ends += ends[pos : m.start()]
            out.append(decoded)
            new_starts += [starts[m.start()]] * len(decoded)
            new_ends += [ends[m.end() - 1]] * len(decoded)
            pos = m.end()
        if not pos:
            break
        out.append(text[pos:])
        text, starts, ends = "".join(out), new_starts + starts[pos:], new_ends + ends[pos:]
        if "&" not in text:
            break
    return text, starts, ends


def find_pii(text: str) -> list[tuple[str, int, int]]:
    """Non-overlapping (type, start, end) spans, earlier detectors winning. Detection reads the text with its
    HTML character references decoded (`john&#64;example.com` is an email); spans are in `text` itself."""
    decoded, starts, ends = _decode_refs(text)
    spans = _find(decoded)
    if starts is None or ends is None:
        return spans
    return [(kind, starts[s], ends[e - 1]) for kind, s, e in spans]


def _find(text: str) -> list[tuple[str, int, int]]:
    spans: list[tuple[str, int, int]] = []
    present = {m.group(1) for m in _NEEDLES.finditer(text.lower())}
    for kind, pattern, check, needles in DETECTORS:
        if needles is not None and present.isdisjoint(needles):
            continue
        for m in pattern.finditer(text):
            span: tuple[int, int] | None = (m.start(), m.end())
            if check and not check(m):
                span = _shorter(kind, pattern, check, m)
                if span is None:
                    continue
            start, end = span
            if any(s < end and start < e for _, s, e in spans):
                continue
            spans.append((kind, start, end))
    return sorted(spans, key=lambda s: s[1])


def redact(text: str) -> tuple[str, dict[str, int]]:
    counts: dict[str, int] = {}
    for kind, start, end in reversed(find_pii(text)):
        text = f"{text[:start]}[{kind}]{text[end:]}"
        counts[kind] = counts.get(kind, 0) + 1
    return text, counts


def quarantined(source: str, line: int, reason: str, detail: str, raw: str, redacted: bool = False) -> Quarantined:
    """A quarantine record with its text redacted (`redacted`: `raw` is already cleaned text, saving a pass)."""
    raw = raw[:RAW_KEEP_CHARS]
    return Quarantined(source, line, reason, redact(detail[:500])[0], raw if redacted or not raw else redact(raw)[0])


def quarantine(batch: Batch, example: Example, reason: str, detail: str, redacted: bool = False) -> None:
    """Move `example` out of the batch's kept examples' future into its quarantine, redacted."""
    raw = json.dumps({"messages": example.messages, "rejected": example.rejected}, ensure_ascii=False)
    batch.quarantine.append(quarantined(example.source, example.line, reason, detail, raw, redacted))


def scrub(ex: Example) -> tuple[list[str], dict[str, int]]:
    """Every turn of `ex` (and a preference pair's rejected answer) normalised and redacted; PII found per type."""
    counts: dict[str, int] = {}
    out = []
    for text in [m["content"] for m in ex.messages] + ([ex.rejected] if ex.rejected is not None else []):
        content, found = redact(normalise(text))
        for k, v in found.items():
            counts[k] = counts.get(k, 0) + v
        out.append(content)
    return out, counts


def pii_detail(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}×{v}" for k, v in sorted(counts.items()))


def clean(batch: Batch, policy: str = "redact") -> Batch:
    """Normalise every turn (and a preference pair's rejected answer) and apply the PII policy to all of them;
    dropped examples go to quarantine with reason `pii` (redacted there too). In the data chain validation has
    already quarantined examples with PII under `pii: drop` (they count against the batch's quarantine share)."""
    kept = []
    for ex in batch.examples:
        out, counts = scrub(ex)
        for k, v in counts.items():
            batch.pii[k] = batch.pii.get(k, 0) + v
        if counts and policy == "drop":
            quarantine(batch, ex, "pii", pii_detail(counts))
            continue
        if any(not t for t in out):
            quarantine(batch, ex, "empty_content", "a turn is empty after normalisation")
            continue
        ex.messages = [{"role": m["role"], "content": c} for m, c in zip(ex.messages, out, strict=False)]
        if ex.rejected is not None:
            ex.rejected = out[-1]
        kept.append(ex)
    batch.examples = kept
    return batch
