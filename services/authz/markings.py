"""The content-marking guard (issue 12 item 2): classification markings in the prompt's own text.

A caller who declares UNCLASSIFIED, or nothing, while pasting a paragraph marked `(S//NF)` must not
get it past the no-write-down rule. This finds the markings that defense documents carry (the CAPCO
register's banner lines and portion markings, the DoD CUI markings) and takes their high-water
mark; authz raises the request's input label to it when it is above what the caller declared. It
is a safety net for text that says what it is, never a classifier: unmarked classified text passes
it, and a marking is believed wherever it stands, in a code block or a quotation too.

Recognised (upper or lower case unless said):
- a portion marking with controls, wherever a word may start: `(S//NF)`, `(ts//si//nf)`,
  `(U//FOUO)`, `(C//REL TO USA, FVEY)`, `(CUI//SP-PRVCY)`;
- a level alone in parentheses, in upper case, opening a line (after indentation, a bullet, a
  number, a quote or comment marker): `(TS)`, `(S)`, `(C)`, `(CUI)`. Elsewhere `(C)` is a copyright
  sign and `(s)` a plural;
- a level written out with controls, anywhere: `SECRET//NOFORN`, `TOP SECRET//SI/TK//NOFORN`, `CUI//SP-PRVCY`;
- a banner line: a line that is only a level written out in upper case, optionally after
  `CLASSIFICATION:`: `SECRET`, `TOP SECRET`, `CONFIDENTIAL`, `CUI`;
- any of these split across two consecutive messages, and written with full-width letters, with
  invisible characters inside, or with Cyrillic or Greek look-alike letters (text is NFKC-normalised,
  format characters are removed and look-alikes read as the Latin letter first).

What a marking adds to the label:
- its level;
- the SCI control systems SI, TK, HCS, KDK, RSV and BUR (a sub-compartment such as `SI-G` counts as
  its system);
- the dissemination controls NOFORN (NF), ORCON (OC), IMCON (IMC), PROPIN (PR) and FISA.

Releasability markings (`REL TO`, `RELIDO`, `DISPLAY ONLY`) widen release, so they add no control.
FOUO, LES, SBU, LIMDIS and CUI categories mark controlled unclassified information: at least CUI.
Other controls are ignored.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

from msgspec import Struct

from ...schemas.labels import Label, format_label, join

_LEVEL = {"TOP SECRET": 4, "TS": 4, "SECRET": 3, "S": 3, "CONFIDENTIAL": 2, "C": 2, "CUI": 1, "UNCLASSIFIED": 0,
          "U": 0}
_SHORT = {4: "TS", 3: "S", 2: "C", 1: "CUI", 0: "U"}
_SCI = ("SI", "TK", "HCS", "KDK", "RSV", "BUR")
_DISSEM = {"NF": "NOFORN", "NOFORN": "NOFORN", "OC": "ORCON", "ORCON": "ORCON", "IMC": "IMCON", "IMCON": "IMCON",
           "PR": "PROPIN", "PROPIN": "PROPIN", "FISA": "FISA"}
_CONTROLLED_UNCLASSIFIED = ("FOUO", "LES", "SBU", "LIMDIS")
_CUI_CATEGORY = ("SP-", "CUI")  # CUI//SP-PRVCY, CUI//PRVCY: specified and basic categories

_WORDS = r"TOP[ _-]?SECRET|SECRET|CONFIDENTIAL|UNCLASSIFIED|CUI"
# an SCI control with its sub-compartments (`SI-G ABCD`): upper-case words, none of them a level, so
# `SECRET//SI and TOP SECRET//TK` stays two markings
_SCI_TOKEN = (r"(?:SI|TK|HCS|KDK|RSV|BUR)\b(?:-[A-Z0-9]+)?"
              r"(?-i:(?: (?!(?:TOP|SECRET|CONFIDENTIAL|UNCLASSIFIED|CUI)\b)[A-Z0-9]{1,6}\b)*)")
_TOKEN = rf"(?:REL\s+TO\s+[A-Z]{{3,4}}(?:\s*,\s*[A-Z]{{3,4}})*|{_SCI_TOKEN}|[A-Z0-9][A-Z0-9-]*)"
_CONTROLS = rf"{_TOKEN}(?:\s*//?\s*{_TOKEN})*"
# (S//NF): the parentheses bound it, so any case is believed
_PORTION = re.compile(rf"(?<![A-Za-z0-9])\(\s*(?P<level>{_WORDS}|TS|S|C|U)\s*//\s*(?P<controls>{_CONTROLS})\s*\)",
                      re.IGNORECASE)
# (S) opening a line, upper case only
_PORTION_ALONE = re.compile(r"^[ \t>*#/|\"'`-]*(?:\d{1,3}[.)][ \t]+)?(?P<whole>\((?P<level>TS|S|C|CUI)\))(?=\s|$)",
                            re.MULTILINE)
# SECRET//NOFORN in running text
_WRITTEN = re.compile(rf"(?<![A-Za-z0-9/])(?P<level>{_WORDS})\s*//\s*(?P<controls>{_CONTROLS})", re.IGNORECASE)
# a line that is only SECRET
_BANNER = re.compile(r"^[ \t>*#/|=\"'`-]*(?:(?i:CLASSIFICATION)[ \t]*:[ \t]*)?"
                     r"(?P<level>TOP[ _-]?SECRET|SECRET|CONFIDENTIAL|CUI)[ \t>*#/|=\"'`-]*$", re.MULTILINE)
SPAN = 96  # characters of each side of a message boundary searched for a marking split across it


class Found(Struct, frozen=True):
    """One marking: what it means, how it reads (rebuilt from what was recognised, never the
    caller's own characters), and where it starts: message index and character offset."""

    label: Label
    marking: str
    message: int
    offset: int


def _level_of(word: str) -> int:
    return _LEVEL[re.sub(r"[ _-]+", " ", word.upper()).replace("TOPSECRET", "TOP SECRET")]


def _meaning(level: int, controls: str) -> tuple[Label, str]:
    """The label a marking stands for, and the marking rebuilt from what it recognised."""
    kept: set[str] = set()
    shown: list[str] = []
    for raw in re.split(r"\s*/+\s*", controls.upper()) if controls else ():
        token = re.sub(r"\s+", " ", raw.strip())
        system = token.split("-", 1)[0].split(" ", 1)[0]
        if token in _DISSEM:
            kept.add(_DISSEM[token])
            shown.append(token)
        elif system in _SCI:
            kept.add(system)
            shown.append(system)
        elif token in _CONTROLLED_UNCLASSIFIED or (level == 1 and token) or token.startswith(_CUI_CATEGORY):
            level = max(level, 1)
            if token in _CONTROLLED_UNCLASSIFIED:  # a CUI category's own name is the caller's text: not shown
                shown.append(token)
    return Label(level=level, controls=frozenset(kept)), "//".join(shown)


# Cyrillic and Greek letters drawn like the Latin ones a marking is written with: `SЕCRET` with a
# Cyrillic Е reads as SECRET to a person, so it does to the guard (one character for one: offsets hold)
_LOOKALIKES = str.maketrans(
    "АВСЕНІЈКМОРЅТХУаскеорѕхіјуΑΒΕΖΗΙΚΜΝΟΡΤΥΧοκν",
    "ABCEHIJKMOPSTXYackeopsxijyABEZHIKMNOPTYXokv")


def _normalised(text: str) -> str:
    if text.isascii():
        return text
    text = unicodedata.normalize("NFKC", text)
    return "".join(c for c in text if unicodedata.category(c) != "Cf").translate(_LOOKALIKES)


def _in_text(text: str) -> list[tuple[int, int, Label, str]]:
    """(start, end, label, marking) of every marking in one text, none inside another."""
    hits: list[tuple[int, int, Label, str]] = []
    for m in _PORTION.finditer(text):
        level = _level_of(m["level"])
        label, controls = _meaning(level, m["controls"])
        hits.append((m.start(), m.end(), label, f"({_SHORT[level]}//{controls})" if controls else f"({_SHORT[level]})"))
    for m in _PORTION_ALONE.finditer(text):
        level = _level_of(m["level"])
        hits.append((m.start("whole"), m.end("whole"), Label(level=level), f"({_SHORT[level]})"))
    for m in _WRITTEN.finditer(text):
        level = _level_of(m["level"])
        label, controls = _meaning(level, m["controls"])
        hits.append((m.start(), m.end(), label, f"{format_label(Label(level=level))}//{controls}" if controls
                     else format_label(Label(level=level))))
    for m in _BANNER.finditer(text):
        level = _level_of(m["level"])
        hits.append((m.start("level"), m.end("level"), Label(level=level), format_label(Label(level=level))))
    hits.sort(key=lambda h: (h[0], -h[1]))
    kept: list[tuple[int, int, Label, str]] = []
    for hit in hits:  # (S//NF) also reads as S//NF inside it: the outer one is the marking
        if not kept or hit[0] >= kept[-1][1]:
            kept.append(hit)
    return kept


def scan(texts: Sequence[str]) -> list[Found]:
    """Every marking in the messages, in order; one split across two messages counts once, at its start."""
    texts = [_normalised(t) for t in texts]
    found = [Found(label, marking, i, start)
             for i, text in enumerate(texts) for start, _, label, marking in _in_text(text)]
    for i in range(len(texts) - 1):
        tail, head = texts[i][-SPAN:], texts[i + 1][:SPAN]
        for start, end, label, marking in _in_text(tail + head):
            if start < len(tail) < end:  # across the boundary: neither message holds it whole
                found.append(Found(label, marking, i, len(texts[i]) - len(tail) + start))
    return sorted(found, key=lambda f: (f.message, f.offset))


def high_water(found: Iterable[Found]) -> Label | None:
    """The least label that dominates every marking found (None: none found)."""
    top: Label | None = None
    for f in found:
        top = f.label if top is None else join(top, f.label)
    return top


def describe(found: Sequence[Found], limit: int = 3) -> str:
    """The markings for a denial or a log line: each one and where it starts, never the text around it."""
    shown = [f"{f.marking} at message {f.message + 1}, character {f.offset}" for f in found[:limit]]
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return "; ".join(shown) + more
