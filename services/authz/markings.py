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
- a level written out with controls, anywhere: `SECRET//NOFORN`, `TOP SECRET//SI/TK//NOFORN`,
  `CUI//SP-PRVCY`; abbreviated (`TS//SCI`, `S//NF`) when a control we know follows;
- a banner line: a line that is only a level written out in upper case, optionally after
  `CLASSIFICATION:`: `SECRET`, `TOP SECRET`, `CONFIDENTIAL`, `CUI`;
- any of these split across messages, written with full-width letters, dashes or slashes of other
  scripts, Cyrillic or Greek look-alike letters, or invisible characters inside, and with any line
  ending (text is normalised first; positions are those of the caller's own text).

What a marking adds to the label:
- its level;
- the SCI control systems SI, TK, HCS, KDK, RSV and BUR (a sub-compartment such as `SI-G` counts as
  its system);
- the dissemination controls NOFORN (NF), ORCON (OC), IMCON (IMC), PROPIN (PR) and FISA.

Releasability markings (`REL TO`, `RELIDO`, `DISPLAY ONLY`) widen release, so they add no control.
FOUO, LES, SBU, LIMDIS and CUI categories mark controlled unclassified information: at least CUI.
Other controls are ignored.

Every pattern here is linear: a regex only finds where a marking may start, and its controls are
read by a tokenizer that never backtracks and stops after `CONTROLS_READ` characters (a nested
pattern took seconds on a 74-character prompt, found by a hostile review).

`RULES` names this recognizer. A change of what is recognised is a new version beside this one,
chosen by `admission.toml [content_marking] rules`, so replay re-decides old requests as decided.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

from msgspec import Struct

from ...schemas.labels import Label, format_label, join

RULES = 1
_LEVEL = {"TOP SECRET": 4, "TS": 4, "SECRET": 3, "S": 3, "CONFIDENTIAL": 2, "C": 2, "CUI": 1, "UNCLASSIFIED": 0,
          "U": 0}
_SHORT = {4: "TS", 3: "S", 2: "C", 1: "CUI", 0: "U"}
_SCI = ("SI", "TK", "HCS", "KDK", "RSV", "BUR")
_DISSEM = {"NF": "NOFORN", "NOFORN": "NOFORN", "OC": "ORCON", "ORCON": "ORCON", "IMC": "IMCON", "IMCON": "IMCON",
           "PR": "PROPIN", "PROPIN": "PROPIN", "FISA": "FISA"}
_CONTROLLED_UNCLASSIFIED = ("FOUO", "LES", "SBU", "LIMDIS")
_CUI_CATEGORY = ("SP-", "CUI")  # CUI//SP-PRVCY, CUI//PRVCY: specified and basic categories
_KNOWN = {*_SCI, *_DISSEM, *_CONTROLLED_UNCLASSIFIED, "SCI", "REL", "RELIDO"}  # what an abbreviated form needs
CONTROLS_READ = 160  # characters of controls read after `//`; CAPCO's longest real markings are far shorter
SPAN = 96  # characters each side of a message boundary kept when markings split across messages are sought

_WORDS = r"TOP[ \t_-]*SECRET|SECRET|CONFIDENTIAL|UNCLASSIFIED|CUI"
# where a marking may start; its controls are read by `_controls`
_PORTION_HEAD = re.compile(rf"(?<![A-Za-z0-9])\([ \t]*(?P<level>{_WORDS}|TS|S|C|U)[ \t]*//", re.IGNORECASE)
_PORTION_ALONE = re.compile(r"^[ \t>*#/|\"'`-]*(?:\d{1,3}[.)][ \t]+)?(?P<whole>\((?P<level>TS|S|C|CUI)\))(?=\s|$)",
                            re.MULTILINE)
_WRITTEN_HEAD = re.compile(rf"(?<![A-Za-z0-9/])(?P<level>{_WORDS}|TS|S|C|U)[ \t]*//", re.IGNORECASE)
_BANNER = re.compile(r"^[ \t>*#/|=\"'`-]*(?:(?i:CLASSIFICATION)[ \t]*:[ \t]*)?"
                     r"(?P<level>TOP[ \t_-]*SECRET|SECRET|CONFIDENTIAL|CUI)[ \t>*#/|=\"'`-]*$", re.MULTILINE)
# one control: `REL TO USA, FVEY`, an SCI system with upper-case sub-compartments (`SI-G ABCD`), or a word
_REL_TO = re.compile(r"REL[ \t]+TO[ \t]+[A-Z]{3,4}(?:[ \t]*,[ \t]*[A-Z]{3,4}){0,12}", re.IGNORECASE)
_SCI_TOKEN = re.compile(r"(?:SI|TK|HCS|KDK|RSV|BUR)\b(?:-[A-Z0-9]{1,8})?(?-i:(?: (?!TOP\b|SECRET\b|CONFIDENTIAL\b|"
                        r"UNCLASSIFIED\b|CUI\b)[A-Z0-9]{1,6}\b){0,4})", re.IGNORECASE)
_WORD = re.compile(r"[A-Z0-9][A-Z0-9-]{0,31}", re.IGNORECASE)
_SEPARATOR = re.compile(r"[ \t]*//?[ \t]*")
_CLOSE = re.compile(r"[ \t]*\)")

# Cyrillic and Greek letters drawn like the Latin ones a marking is written with: `SЕCRET` with a
# Cyrillic Е reads as SECRET to a person, so it does to the guard
_LOOKALIKES = str.maketrans(
    "АВСЕНІЈКМОРЅТХУаскеорѕхіјуΑΒΕΖΗΙΚΜΝΟΡΤΥΧοκν" "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63"
    "\u2044\u2215\u29f8\u2571" "\u2028\u2029\u0085\r\u000b\u000c",
    "ABCEHIJKMOPSTXYackeopsxijyABEZHIKMNOPTYXokv" "---------" "////" "\n\n\n\n\n\n")
# Default-ignorable code points (Unicode's DerivedCoreProperties): drawn as nothing, so `SEC\ufe0fRET`
# reads as SECRET to a person; removed before scanning
_IGNORABLE = re.compile("[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
                        "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
                        "\U000e0000-\U000e0fff]")
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")


class Found(Struct, frozen=True):
    """One marking: what it means, how it reads (rebuilt from what was recognised, never the
    caller's own characters), and where it starts in the caller's own text: message index and
    character offset."""

    label: Label
    marking: str
    message: int
    offset: int


def _level_of(word: str) -> int:
    return _LEVEL[re.sub(r"[ \t_-]+", " ", word.upper()).replace("TOPSECRET", "TOP SECRET")]


def _controls(text: str, start: int) -> tuple[int, list[str]]:
    """The controls written from `start` (after a `//`): where they end, and each one. Reads one
    token at a time, each a bounded pattern tried once, so the cost is linear in what it reads."""
    end, pos, tokens = min(len(text), start + CONTROLS_READ), start, []
    while pos < end:
        while pos < end and text[pos] in " \t":
            pos += 1
        m = _REL_TO.match(text, pos, end) or _SCI_TOKEN.match(text, pos, end) or _WORD.match(text, pos, end)
        if m is None:
            break
        tokens.append(re.sub(r"\s+", " ", m.group().upper()))
        pos = m.end()
        sep = _SEPARATOR.match(text, pos, end)
        if sep is None or sep.end() == pos or not (_WORD.match(text, sep.end(), end)):
            break
        pos = sep.end()
    return pos, tokens


def _meaning(level: int, controls: list[str]) -> tuple[Label, str]:
    """The label a marking stands for, and its controls rebuilt from what was recognised."""
    kept: set[str] = set()
    shown: list[str] = []
    for token in controls:
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
        elif token == "SCI":  # some SCI, none named: the level counts
            shown.append(token)
    return Label(level=level, controls=frozenset(kept)), "//".join(shown)


def _in_text(text: str) -> list[tuple[int, int, Label, str]]:
    """(start, end, label, marking) of every marking in one normalised text, none inside another."""
    hits: list[tuple[int, int, Label, str]] = []
    for m in _PORTION_HEAD.finditer(text):
        end, controls = _controls(text, m.end())
        close = _CLOSE.match(text, end)
        if close is None:  # `(S//` never closed: not a portion marking (the written form may still be)
            continue
        level = _level_of(m["level"])
        label, shown = _meaning(level, controls)
        hits.append((m.start(), close.end(), label, f"({_SHORT[level]}//{shown})" if shown else f"({_SHORT[level]})"))
    for m in _PORTION_ALONE.finditer(text):
        level = _level_of(m["level"])
        hits.append((m.start("whole"), m.end("whole"), Label(level=level), f"({_SHORT[level]})"))
    for m in _WRITTEN_HEAD.finditer(text):
        end, controls = _controls(text, m.end())
        abbreviated = m["level"].upper() in ("TS", "S", "C", "U")
        if not controls or (abbreviated and not any(c.split("-")[0].split(" ")[0] in _KNOWN for c in controls)):
            continue  # `S//` before a word we do not know is a path or a URL, not a marking
        level = _level_of(m["level"])
        label, shown = _meaning(level, controls)
        head = format_label(Label(level=level))
        hits.append((m.start(), end, label, f"{head}//{shown}" if shown else head))
    for m in _BANNER.finditer(text):
        level = _level_of(m["level"])
        hits.append((m.start("level"), m.end("level"), Label(level=level), format_label(Label(level=level))))
    hits.sort(key=lambda h: (h[0], -h[1]))
    kept: list[tuple[int, int, Label, str]] = []
    for hit in hits:  # (S//NF) also reads as S//NF inside it: the outer one is the marking
        if not kept or hit[0] >= kept[-1][1]:
            kept.append(hit)
    return kept


def normalised(text: str) -> tuple[str, list[int] | None]:
    """The text as the guard reads it, and for each of its characters the offset in `text` it came
    from (None: the same offsets, for text that needed no change of length)."""
    text = text.translate(_LOOKALIKES)
    if text.isascii():
        return text, None
    out: list[str] = []
    origin: list[int] = []
    pos = 0
    for run in _NON_ASCII_RUN.finditer(text):
        out.append(text[pos:run.start()])
        origin.extend(range(pos, run.start()))
        pos = run.end()
        if unicodedata.is_normalized("NFKC", run.group()) and not _IGNORABLE.search(run.group()):
            out.append(run.group())  # most text of other scripts: nothing to change, char by char or not
            origin.extend(range(run.start(), run.end()))
            continue
        for i in range(run.start(), run.end()):
            if _IGNORABLE.match(text, i):
                continue
            piece = unicodedata.normalize("NFKC", text[i]).translate(_LOOKALIKES)
            out.append(piece)
            origin.extend([i] * len(piece))
    out.append(text[pos:])
    origin.extend(range(pos, len(text)))
    return "".join(out), origin


def scan(texts: Sequence[str]) -> list[Found]:
    """Every marking in the messages, in order, each at its start in the caller's own text; one split
    across messages counts once, where it starts."""
    read = [normalised(t) for t in texts]

    def place(i: int, at: int) -> int:
        origin = read[i][1]
        return at if origin is None else origin[min(at, len(origin) - 1)] if origin else 0

    found = [Found(label, marking, i, place(i, start))
             for i, (text, _) in enumerate(read) for start, _, label, marking in _in_text(text)]
    # split across messages: the messages' edges read as one text, each position mapped back to its message
    edges: list[str] = []
    owner: list[tuple[int, int]] = []  # (message, offset in its normalised text) of each character of `edges`
    for i, (text, _) in enumerate(read):
        cut = text if len(text) <= 2 * SPAN else text[:SPAN] + "\n" + text[-SPAN:]
        offsets = (range(len(text)) if len(text) <= 2 * SPAN
                   else [*range(SPAN), SPAN, *range(len(text) - SPAN, len(text))])
        edges.append(cut)
        owner.extend((i, o) for o in offsets)
    joined = "".join(edges)
    for start, end, label, marking in _in_text(joined):
        first, last = owner[start][0], owner[end - 1][0]
        if first != last:  # across a boundary: no single message holds it whole
            found.append(Found(label, marking, first, place(first, owner[start][1])))
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
