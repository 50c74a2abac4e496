"""IETF AI preferences: the Content-Usage expression as draft-ietf-aipref-vocab-08 processes it."""

from __future__ import annotations

import pytest

from proxy import aipref
from proxy.aipref import Preference


@pytest.mark.parametrize(
    ("expression", "training"),
    [
        ("train-ai=n", Preference.DISALLOW),
        ("train-ai=y", Preference.ALLOW),
        ("train-ai=y, search=n", Preference.ALLOW),
        ("search=y, ai-use=n", Preference.UNKNOWN),  # neither covers training
        ("", Preference.UNKNOWN),
        # Values must be the Tokens y or n: a String, a Boolean, an Integer, a list say nothing.
        ('train-ai="n"', Preference.UNKNOWN),
        ("train-ai", Preference.UNKNOWN),
        ("train-ai=?0", Preference.UNKNOWN),
        ("train-ai=0", Preference.UNKNOWN),
        ("train-ai=(n)", Preference.UNKNOWN),
        ("train-ai=no", Preference.UNKNOWN),
        # Keys are lower-case bytes: upper case fails the whole Dictionary.
        ("Train-AI=n", Preference.UNKNOWN),
        ("train-ai=n, Search=y", Preference.UNKNOWN),
        # Syntax errors fail the whole field (RFC 9651 4.2): no preference at all.
        ("train-ai=n,", Preference.UNKNOWN),
        ("train-ai=n;", Preference.UNKNOWN),
        ("train-ai=n search=y", Preference.UNKNOWN),
        # Parameters and unknown keys are ignored.
        ('train-ai=n;reason="licence"', Preference.DISALLOW),
        ("foo=bar, train-ai=n, baz=(1 2);x", Preference.DISALLOW),
        ('train-ai=n;when=@1700000000;how=%"caf%c3%a9"', Preference.DISALLOW),
        # A repeated key: the last value counts (vocab-08 6.5.1).
        ("train-ai=n, train-ai=y", Preference.ALLOW),
        ("train-ai=y, train-ai=n", Preference.DISALLOW),
        ('train-ai=n, train-ai="y"', Preference.UNKNOWN),
        # Labels of earlier drafts for categories that contain training still say no.
        ("train-genai=n", Preference.DISALLOW),
        ("bots=n", Preference.DISALLOW),
        ("tdm=n", Preference.DISALLOW),
        ("ai=n, train-ai=y", Preference.DISALLOW),
        # Surrounding spaces are discarded; OWS around commas is allowed.
        ("  train-ai=y ,\tsearch=n  ", Preference.ALLOW),
    ],
)
def test_training_preference(expression: str, training: Preference) -> None:
    assert aipref.parse_usage(expression).training() is training


def test_header_lines_combine_as_one_dictionary() -> None:
    # RFC 9110 5.3: several field lines are one comma-joined value; the later key wins.
    prefs = aipref.parse_header(["search=y", "train-ai=n"])
    assert prefs.explicit == {"search": True, "train-ai": False}
    assert aipref.parse_header(["train-ai=n", "train-ai=y"]).training() is Preference.ALLOW
    assert aipref.parse_header([]).training() is Preference.UNKNOWN
    # One broken line breaks the combined field: nothing is expressed.
    assert not aipref.parse_header(["train-ai=n", "train-ai=n,"])


def test_combining_statements_is_most_restrictive() -> None:
    # vocab-08 5.1: any "n" wins, then any "y".
    header = aipref.parse_usage("train-ai=y, search=y")
    robots = aipref.parse_usage("train-ai=n")
    combined = aipref.combine([header, robots])
    assert combined.get("train-ai") is Preference.DISALLOW
    assert combined.get("search") is Preference.ALLOW
    assert combined.get("ai-use") is Preference.UNKNOWN


def test_labels_are_bounded_to_the_vocabulary() -> None:
    prefs = aipref.parse_usage("train-ai=n, made-up=n, search=y")
    assert prefs.labels() == ["train-ai=n", "search=y"]


@pytest.mark.parametrize(
    "value",
    [b"a=1.5", b'a="x\\"y"', b"a=:aGVsbG8=:", b"a=?1", b"a=(b c);p, d", b"a=-12", b'*a=%"x"'],
)
def test_structured_dictionary_accepts_rfc9651_items(value: bytes) -> None:
    assert aipref.parse_dictionary(value)


@pytest.mark.parametrize(
    "value", [b"a=1.2345", b"a=1234567890123456", b'a="\x01"', b"a=:***:", b"1a=1", b"a=?2"]
)
def test_structured_dictionary_rejects_invalid_items(value: bytes) -> None:
    with pytest.raises(aipref.StructuredFieldError):
        aipref.parse_dictionary(value)
