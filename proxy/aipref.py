"""IETF AI preferences: the usage vocabulary and the `Content-Usage` expressions that carry it.

The drafts are still moving, so everything that depends on their wording lives here and nowhere
else:

- draft-ietf-aipref-vocab-08 (September 2026): categories `train-ai` (AI Training), `ai-use`
  (AI Use) and `search` (Search); an expression is an RFC 9651 Dictionary whose values are the
  Tokens `y` (allow) or `n` (disallow); unknown keys, non-Token values, other Tokens and
  parameters are ignored; a Dictionary that does not parse expresses no preference (section 6);
  several expressions combine to the most restrictive answer (section 5.1).
- draft-ietf-aipref-attach-05 (August 2026): the `Content-Usage` response header field carries
  one expression about the content of that response; a `Content-Usage: <path> <expression>`
  rule in a robots.txt group attaches one to the paths it matches (longest match, as for
  Allow/Disallow; see `proxy.robots`).

Earlier drafts used other labels for categories that contain AI training (`tdm`, `ai`, `genai`
in -00; `bots`, `train-genai` later). Sites still send them, so a `n` for any of those is read
as a `n` for training too: the gateway cannot know whether a team's model is generative, and
an older expression of "no" is still a "no" (guideline principle "no data without consent").
"""

from __future__ import annotations

import base64
import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field

# -- vocabulary ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Category:
    label: str
    title: str
    source: str
    covers_training: bool  # does a "n" for this category forbid using the asset for training?


VOCABULARY: tuple[Category, ...] = (
    Category("train-ai", "AI Training", "draft-ietf-aipref-vocab-08 4.1", True),
    Category("ai-use", "AI Use", "draft-ietf-aipref-vocab-08 4.2", False),
    Category("search", "Search", "draft-ietf-aipref-vocab-08 4.3", False),
    # Labels of earlier drafts that still appear in the wild.
    Category("train-genai", "Generative AI Training", "draft-ietf-aipref-vocab-01..04", True),
    Category("bots", "Automated Processing", "draft-ietf-aipref-vocab-01..02", True),
    Category("tdm", "Text and Data Mining", "draft-ietf-aipref-vocab-00", True),
    Category("ai", "AI Training", "draft-ietf-aipref-vocab-00", True),
    Category("genai", "Generative AI Training", "draft-ietf-aipref-vocab-00", True),
)
CATEGORIES: dict[str, Category] = {c.label: c for c in VOCABULARY}
# The current label for the use every team of the gateway makes of what it collects.
TRAINING = "train-ai"


class Preference(enum.Enum):
    ALLOW = "y"
    DISALLOW = "n"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class UsagePreferences:
    """One statement of preference: the explicit y/n per known category label."""

    explicit: dict[str, bool] = field(default_factory=dict)

    def get(self, label: str) -> Preference:
        value = self.explicit.get(label)
        if value is None:
            return Preference.UNKNOWN
        return Preference.ALLOW if value else Preference.DISALLOW

    def training(self) -> Preference:
        """The answer for AI training: "n" for any category covering training wins."""
        if any(
            not allowed and CATEGORIES[label].covers_training
            for label, allowed in self.explicit.items()
        ):
            return Preference.DISALLOW
        return self.get(TRAINING)

    def labels(self) -> list[str]:
        """`label=y|n` strings for each explicit preference (bounded: known labels only)."""
        return [f"{label}={'y' if allowed else 'n'}" for label, allowed in self.explicit.items()]

    def __bool__(self) -> bool:
        return bool(self.explicit)


NO_PREFERENCE = UsagePreferences()


def combine(statements: Iterable[UsagePreferences]) -> UsagePreferences:
    """Several statements about one asset: per category, any "n" wins, then any "y"
    (draft-ietf-aipref-vocab-08 5.1, "the most restrictive preference applies")."""
    merged: dict[str, bool] = {}
    for statement in statements:
        for label, allowed in statement.explicit.items():
            merged[label] = merged.get(label, True) and allowed
    return UsagePreferences(merged)


def parse_usage(value: str | bytes) -> UsagePreferences:
    """An expression (header value or robots.txt rule value) to preferences.

    Processing per draft-ietf-aipref-vocab-08 6.5: parse an RFC 9651 Dictionary; for each known
    label take the value if it is the Token `y` or `n`; everything else means no preference.
    """
    try:
        members = parse_dictionary(value.encode("latin-1") if isinstance(value, str) else value)
    except (StructuredFieldError, UnicodeEncodeError):
        return NO_PREFERENCE
    explicit: dict[str, bool] = {}
    for key, (item, _params) in members.items():
        if key in CATEGORIES and isinstance(item, Token) and item in ("y", "n"):
            explicit[key] = item == "y"
    return UsagePreferences(explicit)


def parse_header(values: Iterable[str]) -> UsagePreferences:
    """All `Content-Usage` field lines of one message, combined as RFC 9110 5.3 says
    (joined with commas), then parsed as one Dictionary."""
    lines = [v for v in values]
    if not lines:
        return NO_PREFERENCE
    return parse_usage(", ".join(lines))


# -- RFC 9651 structured fields: Dictionary ------------------------------------------------


class StructuredFieldError(ValueError):
    pass


class Token(str):
    """An RFC 9651 Token, kept apart from String: `train-ai=n` is a preference,
    `train-ai="n"` is not."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ByteSequence:
    value: bytes


@dataclass(frozen=True, slots=True)
class Date:
    seconds: int


@dataclass(frozen=True, slots=True)
class DisplayString:
    value: str


type BareItem = int | float | str | Token | ByteSequence | bool | Date | DisplayString
type Parameters = dict[str, BareItem]
type Item = tuple[BareItem, Parameters]
type InnerList = tuple[list[Item], Parameters]
type Member = tuple[BareItem | list[Item], Parameters]

_KEY_START = re.compile(rb"[a-z*]")
_KEY = re.compile(rb"[a-z*][a-z0-9_\-.*]*")
_TOKEN = re.compile(rb"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_NUMBER = re.compile(rb"-?[0-9]+(\.[0-9]*)?")
_BASE64 = re.compile(rb"[A-Za-z0-9+/=]*")
_MAX_FIELD = 64 * 1024  # a preference expression is a few bytes; anything longer is abuse


def parse_dictionary(data: bytes) -> dict[str, Member]:
    """RFC 9651 4.2.2 (Parsing a Dictionary), strict: any error fails the whole field."""
    if len(data) > _MAX_FIELD:
        raise StructuredFieldError("field too long")
    parser = _Parser(data.strip(b" "))
    return parser.dictionary()


class _Parser:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def _peek(self) -> bytes:
        return self.data[self.pos : self.pos + 1]

    def _fail(self, what: str) -> StructuredFieldError:
        return StructuredFieldError(f"{what} at byte {self.pos}")

    def _skip(self, chars: bytes) -> None:
        while self.pos < len(self.data) and self.data[self.pos : self.pos + 1] in chars:
            self.pos += 1

    def dictionary(self) -> dict[str, Member]:
        out: dict[str, Member] = {}
        while self.pos < len(self.data):
            key = self.key()
            if self._peek() == b"=":
                self.pos += 1
                value: BareItem | list[Item]
                if self._peek() == b"(":
                    value, params = self.inner_list()
                else:
                    value, params = self.item()
            else:
                value, params = True, self.parameters()
            out.pop(key, None)  # RFC 9651: a repeated key overwrites the earlier member
            out[key] = (value, params)
            self._skip(b" \t")
            if self.pos >= len(self.data):
                return out
            if self._peek() != b",":
                raise self._fail("expected ','")
            self.pos += 1
            self._skip(b" \t")
            if self.pos >= len(self.data):
                raise self._fail("trailing ','")
        return out

    def key(self) -> str:
        m = _KEY.match(self.data, self.pos)
        if not m or not _KEY_START.match(self.data, self.pos):
            raise self._fail("expected a key")
        self.pos = m.end()
        return m.group().decode("ascii")

    def item(self) -> Item:
        return self.bare_item(), self.parameters()

    def inner_list(self) -> InnerList:
        self.pos += 1  # "("
        items: list[Item] = []
        while self.pos < len(self.data):
            self._skip(b" ")
            if self._peek() == b")":
                self.pos += 1
                return items, self.parameters()
            items.append(self.item())
            if self._peek() not in (b" ", b")"):
                raise self._fail("expected ' ' or ')' in inner list")
        raise self._fail("unterminated inner list")

    def parameters(self) -> Parameters:
        params: Parameters = {}
        while self._peek() == b";":
            self.pos += 1
            self._skip(b" ")
            key = self.key()
            value: BareItem = True
            if self._peek() == b"=":
                self.pos += 1
                value = self.bare_item()
            params[key] = value
        return params

    def bare_item(self) -> BareItem:
        c = self._peek()
        if c == b"-" or c.isdigit():
            return self.number()
        if c == b'"':
            return self.string()
        if c == b"*" or c.isalpha():
            m = _TOKEN.match(self.data, self.pos)
            assert m is not None
            self.pos = m.end()
            return Token(m.group().decode("ascii"))
        if c == b":":
            end = self.data.find(b":", self.pos + 1)
            raw = self.data[self.pos + 1 : end]
            if end < 0 or not _BASE64.fullmatch(raw):
                raise self._fail("bad byte sequence")
            self.pos = end + 1
            try:
                return ByteSequence(base64.b64decode(raw + b"=" * (-len(raw) % 4)))
            except ValueError as e:
                raise self._fail("bad base64") from e
        if c == b"?":
            value = self.data[self.pos + 1 : self.pos + 2]
            if value not in (b"0", b"1"):
                raise self._fail("bad boolean")
            self.pos += 2
            return value == b"1"
        if c == b"@":
            self.pos += 1
            number = self.number()
            if not isinstance(number, int):
                raise self._fail("a date is an integer")
            return Date(number)
        if c == b"%":
            return self.display_string()
        raise self._fail("expected an item")

    def number(self) -> int | float:
        m = _NUMBER.match(self.data, self.pos)
        if not m:
            raise self._fail("expected a number")
        text = m.group()
        digits = text.lstrip(b"-")
        if b"." in text:
            whole, _, frac = digits.partition(b".")
            if len(whole) > 12 or not frac or len(frac) > 3:
                raise self._fail("bad decimal")
            self.pos = m.end()
            return float(text)
        if len(digits) > 15:
            raise self._fail("integer too long")
        self.pos = m.end()
        return int(text)

    def string(self) -> str:
        self.pos += 1
        out = bytearray()
        while self.pos < len(self.data):
            c = self.data[self.pos]
            self.pos += 1
            if c == 0x5C:  # backslash
                nxt = self.data[self.pos : self.pos + 1]
                if nxt not in (b'"', b"\\"):
                    raise self._fail("bad escape")
                out += nxt
                self.pos += 1
            elif c == 0x22:
                return out.decode("ascii")
            elif c < 0x20 or c > 0x7E:
                raise self._fail("bad string character")
            else:
                out.append(c)
        raise self._fail("unterminated string")

    def display_string(self) -> DisplayString:
        if self.data[self.pos : self.pos + 2] != b'%"':
            raise self._fail("bad display string")
        self.pos += 2
        out = bytearray()
        while self.pos < len(self.data):
            c = self.data[self.pos]
            self.pos += 1
            if c == 0x25:  # %
                hexpair = self.data[self.pos : self.pos + 2]
                if not re.fullmatch(rb"[0-9a-f]{2}", hexpair):
                    raise self._fail("bad percent escape")
                out.append(int(hexpair, 16))
                self.pos += 2
            elif c == 0x22:
                try:
                    return DisplayString(out.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise self._fail("bad UTF-8") from e
            elif c < 0x20 or c > 0x7E:
                raise self._fail("bad display string character")
            else:
                out.append(c)
        raise self._fail("unterminated display string")
