"""XML a site wrote (XMP packets, EPUB package documents): parsed by expat with namespaces
resolved (`"URI local"` names) and no DTD, so no entity can expand: a DTD raises ValueError."""

from __future__ import annotations

from typing import Any
from xml.parsers import expat


def parser() -> Any:
    """A fresh expat parser; give it handlers, then `Parse(data, True)`. It raises
    `expat.ExpatError` for XML that is not well-formed, ValueError for a DTD."""
    p = expat.ParserCreate(namespace_separator=" ")
    p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    p.StartDoctypeDeclHandler = _no_dtd
    p.EntityDeclHandler = _no_dtd
    return p


def _no_dtd(*_args: Any) -> None:
    raise ValueError("a DTD is not allowed in this XML")
