"""Source coverage: the sentences of a policy's source texts that no claim quotes.

A policy file quotes the sentences of a provider's privacy policy that it turns into claims; the
rest of each source is what the policy file leaves out. `amnesiac policy show` lists that rest,
per language, with line numbers, and says what share of the source is quoted.

Sentences. A source text is cut by two rules, nothing else:

- Every line break ends a sentence. The shipped sources hold one sentence, list item, heading or
  table row per line (scraped HTML, Markdown), and an unmarked list ("no logging of traffic",
  "no logging of timestamps", ...) can only be told apart by its lines. A paragraph hard-wrapped
  in the source therefore shows as its line pieces; a quote of the whole sentence covers each.
- Inside a line, `.`, `!` or `?` (and any closing quote or bracket after it) followed by white
  space ends a sentence, except a `.` that ends an abbreviation (`e.g.`, `i.e.`, `t.ex.`, `z.B.`:
  any word of short letter groups with dots; and the few in ABBREVIATIONS) or the number that
  opens a numbered heading (`1. Failure to store ...`). `1.2` or `ovpn.com` have no white space
  after the dot, so they never end one.

Each piece is folded as the loader folds quotes (runs of white space become one space), loses a
leading list or heading marker (`*`, `-`, `+`, `•`, `>`, `#`), and is skipped when what is left is
shorter than 3 characters, has no letter or digit (`---`, `|---|---|`) or is one HTML tag (page
markup such as `<div class="table">`).

Covered. A sentence is quoted when its folded text is a substring of a folded quote of its
language (the quote spans it), or a folded quote is a substring of it (a heading run into the
sentence, one clause quoted). A quote that only starts or ends inside a sentence does not cover it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from amnesiac.policy import Policy, fold

# A `.` after one of these never ends a sentence (compared in lower case). Words of dotted letter
# groups (e.g., i.e., t.ex., bl.a., d.v.s., z.B.) are recognised by _DOTTED and need no entry.
# `etc.` is not here: in the shipped sources it ends the sentence each time.
ABBREVIATIONS = frozenset({"approx.", "bzw.", "ca.", "cf.", "dr.", "dvs.", "ggf.", "incl.", "inkl.", "vs."})
MIN_LENGTH = 3  # shorter pieces are markers or stray punctuation, not sentences

# Closing quotes and brackets that may follow the end of a sentence, and their opening twins.
_CLOSING = "\"'\u201d\u2019\u00bb)]"
_OPENING = "\"'\u201c\u2018\u00ab(["
_END = re.compile(f"[.!?]+[{re.escape(_CLOSING)}]*(?=\\s)")
_DOTTED = re.compile(r"(?:[^\W\d_]{1,3}\.){2,}")
_ENUMERATOR = re.compile(r"\d+(?:\.\d+)*\.")
_MARKER = re.compile(r"^(?:[*+•>-]|#{1,6})\s+")
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>]*>")


@dataclass(frozen=True)
class Sentence:
    line: int  # 1-based, the line of the source file the sentence starts on
    text: str  # folded


@dataclass(frozen=True)
class SourceCoverage:
    """How much of one source text the claims of its language quote."""

    language: str
    file: Path
    sentences: int
    covered: int
    percent: float  # of the sentences, one decimal
    percent_of_text: float  # of the sentences' characters, one decimal
    uncovered: tuple[Sentence, ...]


def split_sentences(text: str) -> list[Sentence]:
    """The sentences of a source text, in order, by the rules in the module's docstring."""
    sentences = []
    # Lines as an editor numbers them: only "\n" starts a new one (a stray "\r" is folded away).
    for number, line in enumerate(text.split("\n"), start=1):
        for first, piece in enumerate(_pieces(line)):
            folded = fold(piece)
            if first == 0:
                folded = _MARKER.sub("", folded)
            if _is_sentence(folded):
                sentences.append(Sentence(number, folded))
    return sentences


def _pieces(line: str) -> Iterator[str]:
    start = 0
    for end in _END.finditer(line):
        if _ends_sentence(line[start : end.end()], end.group(), at_line_start=start == 0):
            yield line[start : end.end()]
            start = end.end()
    yield line[start:]


def _ends_sentence(piece: str, punctuation: str, *, at_line_start: bool) -> bool:
    if not punctuation.startswith("."):
        return True  # ! and ? have no abbreviations
    words = piece.split()
    word = words[-1].lstrip(_OPENING).lower()
    if word in ABBREVIATIONS or _DOTTED.fullmatch(word):
        return False
    # "1. Failure to store": the number of a heading; "in paragraph 2.1. This" does end.
    starts_line = at_line_start and len(_MARKER.sub("", fold(piece)).split()) == 1
    return not (starts_line and _ENUMERATOR.fullmatch(word))


def _is_sentence(text: str) -> bool:
    return (
        len(text) >= MIN_LENGTH and any(char.isalnum() for char in text) and _HTML_TAG.fullmatch(text) is None
    )


def measure_source(language: str, file: Path, text: str, quotes: Iterable[str]) -> SourceCoverage:
    """The coverage of one source text by the quotes of its language."""
    folded_quotes = {q for q in map(fold, quotes) if q}
    covered: list[Sentence] = []
    uncovered: list[Sentence] = []
    for sentence in split_sentences(text):
        quoted = any(sentence.text in q or q in sentence.text for q in folded_quotes)
        (covered if quoted else uncovered).append(sentence)
    characters = sum(len(s.text) for s in covered)
    return SourceCoverage(
        language=language,
        file=file,
        sentences=len(covered) + len(uncovered),
        covered=len(covered),
        percent=_percent(len(covered), len(covered) + len(uncovered)),
        percent_of_text=_percent(characters, characters + sum(len(s.text) for s in uncovered)),
        uncovered=tuple(uncovered),
    )


def measure(policy: Policy) -> list[SourceCoverage]:
    """The coverage of each source text of a loaded policy, in the order of policy.sources."""
    folder = policy.path.parent / "sources"
    return [
        measure_source(
            language,
            folder / name,
            policy.source_text(language),
            (quote for claim in policy.claims for quote in claim.text.get(language, [])),
        )
        for language, name in policy.policy.sources.items()
    ]


def _percent(part: int, whole: int) -> float:
    """part of whole in per cent, one decimal, rounded down: 100.0 only when nothing is left
    out (a source with nothing to quote leaves nothing out)."""
    return 100.0 if whole == 0 else math.floor(1000 * part / whole) / 10
