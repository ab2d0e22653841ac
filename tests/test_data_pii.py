"""PII scrubbing: every type, with validation and false-positive guards."""

import pytest

from lmforge.data import scrub_pii
from lmforge.data.pii import luhn_valid


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("Write to jane.doe+lists@mail.example.org today.", "Write to <EMAIL> today.", "email"),
        ("Call 555-123-4567 now.", "Call <PHONE> now.", "phone"),
        ("Call (555) 123-4567 now.", "Call <PHONE> now.", "phone"),
        ("Call +1 555.123.4567 now.", "Call <PHONE> now.", "phone"),
        ("Call +44 20 7946 0958 now.", "Call <PHONE> now.", "phone"),
        ("Host 192.168.1.20 is up.", "Host <IP_ADDRESS> is up.", "ip_address"),
        ("Host 2001:db8::8a2e:370:7334 is up.", "Host <IP_ADDRESS> is up.", "ip_address"),
        ("Host fe80::1%eth0 is up.", "Host <IP_ADDRESS> is up.", "ip_address"),
        ("Card 4111 1111 1111 1111 expires.", "Card <CREDIT_CARD> expires.", "credit_card"),
        ("Card 4111-1111-1111-1111 expires.", "Card <CREDIT_CARD> expires.", "credit_card"),
        ("Card 378282246310005 expires.", "Card <CREDIT_CARD> expires.", "credit_card"),
        ("SSN 078-05-1120 on file.", "SSN <SSN> on file.", "ssn"),
    ],
)
def test_each_type_is_replaced_and_counted(text, expected, kind):
    scrubbed, counts = scrub_pii(text)
    assert scrubbed == expected
    assert counts == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "Card 4111 1111 1111 1112 fails the Luhn check.",
        "Python 3.11.7 was released; see 1.2.3.4.5 and 256.1.1.1.",
        "On 2021-03-15 at 12:30:45, or 12/31/2021.",
        "The float 0.09999999999999995 and the timestamp 1700000000.",
        "Invalid SSNs 000-12-3456 and 666-12-3456 and 123-00-4567.",
        "reST literal block:: and C++ std::vector and MAC 00:1A:2B:3C:4D:5E.",
        "Decorators like @property and user@localhost are not addresses.",
    ],
)
def test_false_positives_are_left_alone(text):
    assert scrub_pii(text) == (text, {})


def test_counts_add_up_by_type():
    text = "a@b.io, c@d.io, 10.0.0.1 and 555-123-4567"
    scrubbed, counts = scrub_pii(text)
    assert scrubbed == "<EMAIL>, <EMAIL>, <IP_ADDRESS> and <PHONE>"
    assert counts == {"email": 2, "ip_address": 1, "phone": 1}


def test_luhn():
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")
    assert luhn_valid("79927398713")
