"""proxy/idn.py: host names in their IDNA 2008 (UTS #46) ASCII form, wherever the gateway reads
one: a request's host, a policy's patterns, a blocklist entry (probe h4: `faß.test` named
`fass.test`, another domain, which a blocklist entry for the former then refused)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.blocklist import Blocklist
from proxy.blocklist import normalize_url
from proxy.governor import compile_policy
from proxy.idn import ascii_host
from proxy.idn import valid_a_label
from proxy.inputs import check_host
from proxy.policy import load_policy
from proxy.sites import normalize_host
from tests.support import base_policy
from tests.support import write_policy


@pytest.mark.parametrize(
    ("name", "ascii"),
    [
        ("faß.test", "xn--fa-hia.test"),  # IDNA 2003: fass.test
        ("straße.de", "xn--strae-oqa.de"),
        ("ὀδυσσεύς.test", "xn--pxac3bcak3d8526a.test"),  # final ς kept (2003: xn--pxac5babi3d8526a)
        ("BÜCHER.test", "xn--bcher-kva.test"),  # mapped to lower case
        ("i❤.ws", "xn--i-7iq.ws"),  # disallowed by IDNA 2008: its IDNA 2003 form, as before
    ],
)
def test_names_take_the_ascii_form_browsers_and_curl_send(name: str, ascii: str) -> None:
    assert ascii_host(name) == ascii
    assert normalize_host(name) == ascii
    assert check_host(name) == (ascii, None)
    assert check_host(ascii) == (ascii, None)
    assert all(valid_a_label(label) for label in ascii.split(".") if label.startswith("xn--"))


def test_a_name_valid_under_neither_is_an_error() -> None:
    with pytest.raises(UnicodeError):
        ascii_host("a\u0300\ufffd..test")
    # Refused by IDNA 2008, and IDNA 2003 would name fass.test (review): no form at all.
    with pytest.raises(UnicodeError):
        ascii_host("faß\u200d.test")
    assert not valid_a_label("xn--zz")


def test_a_policy_entry_for_a_name_with_a_deviation_character_names_that_name(tmp_path: Path):
    policy = base_policy()
    policy["blocklist"] = [
        {"id": "bl-fass", "match": ["faß.test"], "reason": "r", "source": "s"},
        {"id": "bl-strasse", "match": ["*.straße.test"], "reason": "r", "source": "s"},
    ]
    compiled = compile_policy(load_policy(write_policy(tmp_path / "p.yaml", policy)))
    blocklist = Blocklist(list(compiled.policy_blocklist))
    for host, hit in [
        ("xn--fa-hia.test", "bl-fass"),
        ("fass.test", None),  # another domain
        ("www.xn--strae-oqa.test", "bl-strasse"),
        ("www.strasse.test", None),
    ]:
        found = blocklist.match_url(host, normalize_url(f"http://{host}/a.jpg"))
        assert (found.id if found else None) == hit, host
