"""Internationalized host names in their ASCII form, as browsers, curl and registries write them:
IDNA 2008 with the UTS #46 mapping, non-transitional (WHATWG URL). Not Python's `idna` codec
(IDNA 2003), which maps the deviation characters away: `faß.test` would be `fass.test`, another
domain, whose requests a blocklist entry or takedown for `faß.test` would then refuse, while
`ς`, ZWJ and ZWNJ would go the same way. A name IDNA 2008 disallows but IDNA 2003 allowed (an
emoji domain) keeps its IDNA 2003 form, as before.
"""

from __future__ import annotations

import idna

# What IDNA 2003 maps to other letters (sharp s to ss, final sigma to sigma) or drops (ZWNJ, ZWJ),
# and IDNA 2008 keeps: a name with one has no IDNA 2003 form that names the same domain.
_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")


def ascii_host(host: str) -> str:
    """The ASCII (A-label) form of a host name. UnicodeError if it is none under either IDNA,
    or IDNA 2008 refuses it and its IDNA 2003 form would be another name (`faß\u200d.test`
    is not `fass.test`)."""
    try:
        return idna.encode(host, uts46=True).decode("ascii")  # non-transitional (idna 3.x)
    except idna.IDNAError as e:
        if not _DEVIATIONS.isdisjoint(host.lower()):
            raise UnicodeError(f"{host!r} is no valid IDNA 2008 name ({e})") from e
        return host.encode("idna").decode("ascii")  # UnicodeError if not valid either


def valid_a_label(label: str) -> bool:
    """Whether an `xn--` label is the A-label of a name under IDNA 2008 or IDNA 2003."""
    try:
        idna.decode(label)
        return True
    except idna.IDNAError:
        pass
    try:
        label.encode("ascii").decode("idna")
    except UnicodeError:
        return False
    return True
