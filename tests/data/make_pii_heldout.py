# ruff: noqa: E501  (one-line templates read better than split f-strings)
"""Writes tests/data/pii_heldout.jsonl: the held-out PII set, written after the detector was frozen and
without running or reading it (nor the tuning sets). Deterministic (seeded), so the file can be regenerated
and reviewed: `.venv/bin/python tests/data/make_pii_heldout.py`.

Every labelled value appears verbatim in its text; cards carry a valid Luhn digit and IBANs valid mod-97
check digits (and the country's BBAN checks), both computed and validated with python-stdnum, SSNs pass
stdnum.us.ssn. Lines mix languages (en, de, fr, es, nl, it, pt) and formats (chat, e-mail, log, JSON, CSV);
hard-negative lines carry look-alikes that are not PII: order numbers, versions, 4-part build numbers,
dates, hashes, UUIDs, tracking numbers, Luhn-failing 16-digit references.
"""

from __future__ import annotations

import json
import random
import string
import uuid
from pathlib import Path

from stdnum import iban, luhn
from stdnum.us import ssn

OUT = Path(__file__).with_name("pii_heldout.jsonl")
rng = random.Random(20261129)

FIRST = (
    "anna bob carla david elena farid greta hugo ines jan kofi lena marco nora olga pablo rui sara tomas ute".split()
)
LAST = "schmidt dupont garcia jansen rossi silva novak okafor lindqvist kowalski moreau bauer costa berg".split()
DOMAINS = (
    "gmail.com outlook.de web.de orange.fr yahoo.es kpnmail.nl libero.it sapo.pt acme-corp.com mail.example.org".split()
)


def email() -> str:
    f, last, d = rng.choice(FIRST), rng.choice(LAST), rng.choice(DOMAINS)
    form = rng.randrange(6)
    if form == 0:
        return f"{f}.{last}@{d}"
    if form == 1:
        return f"{f}{rng.randint(1, 99)}@{d}"
    if form == 2:
        return f"{f[0]}.{last}+support@{d}"
    if form == 3:
        return f"{f.capitalize()}.{last.capitalize()}@{d}"
    if form == 4:
        return f"{last}_{f}@billing.{d}"
    return f"{f}-{last}@{d}"


def _d(n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def phone() -> str:
    form = rng.randrange(12)
    return [
        lambda: f"+44 20 7946 {_d(4)}",
        lambda: f"({rng.randint(201, 989)}) 555-{_d(4)}",
        lambda: f"+1-{rng.randint(201, 989)}-555-{_d(4)}",
        lambda: f"+49 30 {_d(8)}",
        lambda: f"0151 {_d(8)}",
        lambda: f"+33 6 {_d(2)} {_d(2)} {_d(2)} {_d(2)}",
        lambda: f"06 {_d(2)} {_d(2)} {_d(2)} {_d(2)}",
        lambda: f"+34 6{_d(2)} {_d(3)} {_d(3)}",
        lambda: f"+31 6 {_d(8)}",
        lambda: f"+39 3{_d(2)} {_d(3)} {_d(4)}",
        lambda: f"+351 9{_d(2)} {_d(3)} {_d(3)}",
        lambda: f"{rng.randint(201, 989)}.555.{_d(4)}",
    ][form]()


def ssn_value() -> str:
    while True:
        v = f"{rng.randint(1, 899):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
        if v[:3] != "666" and ssn.is_valid(v):
            return v if rng.random() < 0.8 else v.replace("-", " ")


def card() -> str:
    kind = rng.randrange(5)
    prefix, length = [
        ("4", 16),
        (str(rng.randint(51, 55)), 16),
        (rng.choice(["34", "37"]), 15),
        ("6011", 16),
        ("4", 16),
    ][kind]
    body = prefix + _d(length - len(prefix) - 1)
    number = body + luhn.calc_check_digit(body)
    assert luhn.is_valid(number)
    if length == 15:
        return f"{number[:4]} {number[4:10]} {number[10:]}"
    style = rng.randrange(3)
    if style == 0:
        return " ".join(number[i : i + 4] for i in range(0, 16, 4))
    if style == 1:
        return "-".join(number[i : i + 4] for i in range(0, 16, 4))
    return number


BBAN = {  # country: BBAN shape (n digit, a upper letter, c alnum upper)
    "DE": "n" * 18,
    "GB": "aaaa" + "n" * 14,
    "FR": "n" * 10 + "c" * 11 + "nn",
    "ES": "n" * 20,
    "NL": "aaaa" + "n" * 10,
    "IT": "a" + "n" * 10 + "c" * 12,
    "BE": "n" * 12,
    "CH": "n" * 5 + "c" * 12,
    "AT": "n" * 16,
    "PT": "n" * 21,
}


def iban_value() -> str:
    while True:
        cc = rng.choice(list(BBAN))
        chars = {"n": string.digits, "a": string.ascii_uppercase, "c": string.digits + string.ascii_uppercase}
        bban = "".join(rng.choice(chars[k]) for k in BBAN[cc])
        number = cc + iban.calc_check_digits(cc + "00" + bban) + bban
        if iban.is_valid(number):  # also the country's own BBAN checks (FR, ES, IT, BE ... national keys)
            return iban.format(number) if rng.random() < 0.6 else number


def ip() -> str:
    form = rng.randrange(6)
    if form == 0:
        return f"192.168.{rng.randint(0, 254)}.{rng.randint(2, 254)}"
    if form == 1:
        return f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}"
    if form == 2:
        return f"2a02:{rng.randint(0x1000, 0xFFFF):x}:{rng.randint(0, 0xFFFF):x}::{rng.randint(1, 0xFFFF):x}"
    return f"{rng.choice([31, 46, 81, 85, 91, 109, 176, 185, 212, 217])}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


def _rs(n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def secret() -> str:
    form = rng.randrange(9)
    return [
        lambda: "AKIA" + _rs(16, string.ascii_uppercase + string.digits),
        lambda: _rs(40, string.ascii_letters + string.digits + "/+"),  # AWS secret access key (labelled in context)
        lambda: "ghp_" + _rs(36),
        lambda: "xoxb-" + _d(12) + "-" + _d(13) + "-" + _rs(24),
        lambda: "sk_live_" + _rs(24),
        lambda: "sk-proj-" + _rs(48, string.ascii_letters + string.digits + "_-"),
        lambda: "AIza" + _rs(35, string.ascii_letters + string.digits + "_-"),
        lambda: (
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
            + _rs(36)
            + "."
            + _rs(43, string.ascii_letters + string.digits + "_-")
        ),
        lambda: "glpat-" + _rs(20),
    ][form]()


GEN = {"EMAIL": email, "PHONE": phone, "SSN": ssn_value, "CARD": card, "IBAN": iban_value, "IP": ip, "SECRET": secret}

TEMPLATES = {
    "EMAIL": [
        "Please send the invoice to {v} instead of my old address.",
        "Bitte schicken Sie die Rechnung an {v}, danke!",
        "Pouvez-vous répondre à {v} ? Je n'ai plus accès à l'autre boîte.",
        "Mi correo nuevo es {v}, actualízalo por favor.",
        "Stuur de bevestiging naar {v} a.u.b.",
        "user> can u add {v} as admin on the workspace",
        'From: "Support" <{v}>',
        "Il mio indirizzo è {v}",
        "O meu email é {v}, obrigado.",
        '{{"contact": "{v}", "plan": "pro"}}',
    ],
    "PHONE": [
        "Call me back on {v} after 5pm please.",
        "Meine Handynummer ist {v}.",
        "Vous pouvez me joindre au {v}.",
        "Mi número es {v}, llamad antes de las 14h.",
        "Bel me op {v} als het pakket er is.",
        "customer phone: {v} | callback requested",
        "Il mio cellulare: {v}",
        "Liguem para {v} por favor.",
        "name,phone\nJ. Doe,{v}",
        "agent: what's the best number? user: {v}",
    ],
    "SSN": [
        "My SSN is {v}, the form keeps rejecting it.",
        "For the W-9 I entered SSN {v}.",
        "user: social security number {v} — is that needed for payroll?",
        "Tax ID (SSN): {v}",
        "employee_ssn={v} status=pending",
        "They asked for my social {v} on the phone, is that legit?",
        "Die US-Sozialversicherungsnummer meines Mannes lautet {v}.",
        "Número de seguro social (EE. UU.): {v}",
    ],
    "CARD": [
        "I was charged twice on my card {v}.",
        "Meine Kreditkarte {v} wurde abgelehnt.",
        "Ma carte {v} expire le mois prochain, comment la changer ?",
        "Pagué con la tarjeta {v} y no llegó el recibo.",
        "card_number: {v}\nexp: 09/27",
        "Can you refund to {v}? That is the Visa I used.",
        "Mijn creditcard {v} is geblokkeerd.",
        "Ho pagato con la carta {v}.",
    ],
    "IBAN": [
        "Please refund to IBAN {v}.",
        "Meine IBAN lautet {v}.",
        "Mon IBAN : {v}",
        "Transferencia a la cuenta {v}, por favor.",
        "Rekeningnummer: {v}",
        "iban,{v},approved",
        "Il mio IBAN è {v}",
        "Reembolso para o IBAN {v}",
        "Bank details changed - new account {v}",
    ],
    "IP": [
        "I can't log in from {v}, it says blocked.",
        "Login failed for user from {v} at 09:14",
        "Mein Router hat die Adresse {v}.",
        "L'adresse IP du serveur est {v}.",
        "Whitelist {v} please, it's our office.",
        "[warn] rate limit exceeded client={v} path=/api/v2/orders",
        "La mia IP pubblica è {v}",
        "Bloqueado desde {v}, ayuda",
    ],
    "SECRET": [
        "Here is our key, can you check why it fails: {v}",
        "export API_TOKEN={v}",
        "Authorization: Bearer {v}",
        "Mein API-Schlüssel {v} funktioniert nicht mehr.",
        'config: {{"token": "{v}"}}',
        "Voici la clé : {v} (ne pas partager)",
        "aws_secret_access_key = {v}",
        "webhook secret is {v} - rotate it?",
    ],
}

NEGATIVES = [
    lambda: (
        f"Order #{_d(5)} was shipped on {rng.randint(1, 28)} May, tracking 1Z{_rs(6, string.ascii_uppercase + string.digits)}{_d(10)}."
    ),
    lambda: f"We upgraded to v{rng.randint(1, 4)}.{rng.randint(0, 20)}.{rng.randint(0, 9)} and the export broke.",
    lambda: f"Windows build 10.0.{rng.randint(17000, 22631)}.{rng.randint(100, 4000)} shows the error.",
    lambda: (
        f"Firmware {rng.randint(1, 9)}.{rng.randint(0, 99)}.{rng.randint(0, 99)}.{rng.randint(0, 999)} is installed on the router."
    ),
    lambda: f"Die Bestellung {rng.randint(1, 9)}{_d(8)} kam am {rng.randint(1, 28)}.{rng.randint(1, 12)}.2026 an.",
    lambda: f"Commit {_rs(40, '0123456789abcdef')} introduced the regression.",
    lambda: f"sha256: {_rs(64, '0123456789abcdef')}",
    lambda: f"request_id={uuid.UUID(int=rng.getrandbits(128))} status=500",
    lambda: f"Facture n° FA-{rng.randint(2020, 2026)}-{_d(6)} du {rng.randint(1, 28)}/{rng.randint(1, 12)}/2026.",
    lambda: f"Referencia del pedido: {_luhn_failing()}",
    lambda: (
        f"Ticket {rng.randint(2024, 2026)}-{_d(4)}-{_d(4)} reopened at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}."
    ),
    lambda: f"Total: {rng.randint(1, 9)},{_d(3)}.{_d(2)} EUR incl. VAT, invoice {_d(7)}.",
    lambda: (
        f"Python {rng.choice(['3.11.9', '3.12.4', '3.10.14'])}, torch 2.{rng.randint(0, 13)}.0, CUDA 12.{rng.randint(0, 8)}"
    ),
    lambda: (
        f"SKU {_rs(3, string.ascii_uppercase)}-{_d(4)}-{_rs(2, string.ascii_uppercase)} is out of stock until {rng.randint(2026, 2027)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}."
    ),
    lambda: f"Error 0x{_rs(8, '0123456789ABCDEF')} during setup, step {rng.randint(1, 12)} of 12.",
    lambda: f"md5 {_rs(32, '0123456789abcdef')}  backup-{_d(8)}.tar.gz",
    lambda: f"Pakket {rng.randint(3, 3)}S{_rs(13, string.ascii_uppercase + string.digits)} ligt bij het afhaalpunt.",
    lambda: f"Il codice ordine è {_d(3)}-{_d(7)}-{_d(7)}, consegna prevista il {rng.randint(1, 28)} giugno.",
    lambda: f"ISBN 978-{rng.randint(0, 1)}-{_d(3)}-{_d(5)}-{rng.randint(0, 9)} arrived damaged.",
    lambda: f"Listening on port {rng.randint(1024, 65535)}, pid {_d(5)}, uptime {rng.randint(1, 99)}h.",
    lambda: (
        f"Version string: {rng.randint(1, 30)}.{rng.randint(0, 30)}.{rng.randint(0, 300)}.{rng.randint(0, 300)} (beta)"
    ),
    lambda: f"Le colis {_d(13)} est en cours de livraison.",
    lambda: (
        f"timestamp={rng.randint(1700000000, 1800000000)} latency_ms={rng.randint(5, 900)} retries={rng.randint(0, 3)}"
    ),
    lambda: f"Contrato {rng.randint(100, 999)}/{rng.randint(2020, 2026)}, cliente n.º {_d(6)}.",
    lambda: (
        f"CVE-{rng.randint(2019, 2026)}-{_d(5)} affects versions before {rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}."
    ),
]


def _luhn_failing() -> str:
    while True:
        v = _d(16)
        if not luhn.is_valid(v):
            return v


def main() -> None:
    rows = []
    per_type = 48
    pools = {t: [GEN[t]() for _ in range(per_type)] for t in GEN}
    queue = [(t, v) for t, vs in pools.items() for v in vs]
    rng.shuffle(queue)
    while queue:
        k = 1 if rng.random() < 0.6 or len(queue) < 2 else 2  # some lines carry two spans of different types
        items = [queue.pop()]
        if k == 2 and queue[-1][0] != items[0][0]:
            items.append(queue.pop())
        parts = [rng.choice(TEMPLATES[t]).format(v=v) for t, v in items]
        if rng.random() < 0.3:  # a hard negative in the same line: look-alikes next to real PII
            parts.append(rng.choice(NEGATIVES)())
        rows.append({"text": " ".join(parts), "pii": [{"type": t, "value": v} for t, v in items], "split": "heldout"})
    for _ in range(120):
        rows.append({"text": rng.choice(NEGATIVES)(), "pii": [], "split": "heldout"})
    rng.shuffle(rows)
    for r in rows:  # every value verbatim; checksums by stdnum
        for p in r["pii"]:
            assert p["value"] in r["text"], p
            if p["type"] == "CARD":
                assert luhn.is_valid(p["value"].replace(" ", "").replace("-", ""))
            if p["type"] == "IBAN":
                assert iban.is_valid(p["value"])
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
