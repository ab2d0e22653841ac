"""Scrubbing of personal data: e-mail addresses, phone numbers, IP addresses, card numbers, SSNs.

A model memorises rare strings it sees in training, so personal identifiers are replaced with
typed placeholders (``<EMAIL>``, ``<PHONE>``, ``<IP_ADDRESS>``, ``<CREDIT_CARD>``, ``<SSN>``).
The placeholder keeps the sentence grammatical and tells the model *what kind* of thing stood
there, which matters for learning formats ("write to <EMAIL>").

These are regular expressions with validation, not a named-entity recogniser: they are fast and
predictable, and their limits are known:

- Phone numbers need separators: ``555-123-4567``, ``(555) 123 4567``, ``555.123.4567``,
  ``+1 555 123 4567`` and international numbers starting with ``+`` (8 to 15 digits in groups).
  Ten digits in a row are left alone, because in technical text they are far more often
  timestamps or counters than phone numbers. Numbers written with words are not found.
- Version numbers (``3.11.7``), dates (``2021-03-15``, ``12/31/2021``) and times are not matched
  by the phone or SSN patterns, because those need 3-3-4 or 3-2-4 digit groups.
- Every valid IPv4 address is replaced, including ``127.0.0.1`` and private ranges; a four-part
  version number below 256 (``1.2.3.4``) is indistinguishable from an address and is replaced too.
  IPv6 candidates are confirmed with :mod:`ipaddress`; the bare ``::`` is left alone since it is
  far more often reStructuredText or C++ than an address.
- Card numbers are 13 to 19 digits, optionally grouped with spaces or dashes, and are replaced
  only when the Luhn checksum holds; about one random digit string in ten passes Luhn, so long
  numeric identifiers can be caught too.
- SSNs must be written ``AAA-GG-SSSS`` and follow the issuing rules (no 000, 666 or 9xx area, no
  00 group, no 0000 serial).
- Names and postal addresses are not detected.

The order matters: e-mails first (their domains can contain IP-like or number-like parts), then
IPs, then cards, SSNs and phones, so that a digit run already replaced cannot be claimed twice.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "ip_address": "<IP_ADDRESS>",
    "credit_card": "<CREDIT_CARD>",
    "ssn": "<SSN>",
    "phone": "<PHONE>",
}

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not part of a longer dotted sequence on either side (1.2.3.4.5 is not an address).
_IPV4 = re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w]|\.\d)")
_IPV6_CANDIDATE = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?:%[\w.]+)?(?![\w:])"
)
# Not preceded by "." either: the digits of 0.09999999999999995 are a fraction, not a card.
_CARD = re.compile(r"(?<![\w.-])\d(?:[ -]?\d){12,18}(?![\w]|[ .-]\d)")
_SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w]|-\d)")
_PHONE = re.compile(
    r"""(?<![\w.+-])(?:
        (?:\+?1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}   # North American: 3-3-4 with separators
      | \+\d{1,3}(?:[ .-]\(?\d{1,4}\)?){2,5}                          # international, starting with +
    )(?![\w]|[.-]\d)""",
    re.VERBOSE,
)


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum used by payment cards: double every second digit from the right."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(match: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", match.group(0))
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _is_ipv6(match: re.Match[str]) -> bool:
    text = match.group(0)
    if text.strip(":") == "":
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _is_phone(match: re.Match[str]) -> bool:
    return 8 <= sum(ch.isdigit() for ch in match.group(0)) <= 15


@dataclass(frozen=True)
class _Rule:
    kind: str
    pattern: re.Pattern[str]
    accept: Callable[[re.Match[str]], bool] | None = None


RULES: tuple[_Rule, ...] = (
    _Rule("email", _EMAIL),
    _Rule("ip_address", _IPV4),
    _Rule("ip_address", _IPV6_CANDIDATE, _is_ipv6),
    _Rule("credit_card", _CARD, _is_card),
    _Rule("ssn", _SSN),
    _Rule("phone", _PHONE, _is_phone),
)


def scrub_pii(text: str) -> tuple[str, Counter[str]]:
    """Replace personal data in ``text`` with typed placeholders.

    Returns the scrubbed text and the number of replacements per type (keys of
    :data:`PLACEHOLDERS`). Matches that fail validation (a Luhn-invalid card number, ``12:30:45``
    as IPv6) are left untouched.
    """
    counts: Counter[str] = Counter()
    for rule in RULES:

        def replace(match: re.Match[str], rule: _Rule = rule) -> str:
            if rule.accept is not None and not rule.accept(match):
                return match.group(0)
            counts[rule.kind] += 1
            return PLACEHOLDERS[rule.kind]

        text = rule.pattern.sub(replace, text)
    return text, counts
