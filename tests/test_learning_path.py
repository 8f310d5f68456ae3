"""The README's learning path: its documents exist, in order, and every term of the glossary
below is defined before its first use along that order.

The reading order is the README's: docs/concepts.md sections 1-7, docs/tutorial.md,
docs/concepts.md sections 8-9, docs/getting_started.md, docs/exercises/ (its README,
then each exercise), docs/code_reading.md. Prose only (``_prose``): fenced code blocks,
headings, the contents list of docs/concepts.md and quoted section titles are left out.
A term is *used* where its pattern first matches, and *defined* in
the paragraph its definition pattern matches; the use must not come in an earlier
paragraph than the definition. ``python -m pytest tests/test_learning_path.py -s`` prints
the checklist, term by term.
"""

import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# term: (pattern of any use, pattern of the definition), both case-insensitive regexes on prose
GLOSSARY = {
    "quantization-aware training (QAT)": (r"\bQAT\b|quantization-aware training",
                                          r"\*Quantization-aware training\* \(QAT\)"),
    "scale": (r"\bscales?\b", r"The \*scale\* `s`"),
    "step": (r"\bsteps?\b", r"the \*step\*"),
    "LSB": (r"\bLSBs?\b", r"\*LSB\*"),
    "zero point": (r"\bzero points?\b", r"the \*zero\s+point\* `z`"),
    "grid": (r"\bgrids?\b", r"evenly spaced \*grid\*"),
    "clamp / clip": (r"\bclamp|\bclip", r"\*clamps\* it"),
    "narrow range": (r"\bnarrow\b", r"with the \*narrow range\*"),
    "symmetric / affine": (r"\bsymmetric\b|\baffine\b", r"A \*symmetric\* scheme"),
    "per tensor / per channel": (r"per[- ]tensor|per[- ]channel",
                                 r"One `\(s, z\)` for a whole tensor \(\*per-tensor\*\)"),
    "SQNR": (r"\bSQNR\b", r"\*signal-to-quantization-noise ratio\*"),
    "observer": (r"\bobservers?\b", r"An \*observer\* watches"),
    "calibration": (r"\bcalibrat", r"\*Calibration\* runs"),
    "post-training quantization (PTQ)": (r"\bPTQ\b|post-training quantization",
                                         r"\*Post-training quantization\* \(PTQ\)"),
    "fake quantization": (r"fake[- ]quantiz|\bFakeQuantize\b", r"This is \*fake\s+quantization\*"),
    "latent weight": (r"\blatent\b", r"the \*latent\* \(or \*shadow\*\) weight"),
    "fusion": (r"\bfus(ion|ed|e)\b", r"\*after fusion\*"),
    "straight-through estimator (STE)": (r"\bSTE\b|straight-through", r"The \*straight-through estimator\* \(STE"),
    "BatchNorm folding": (r"\bfold", r"is \*folded\* into it"),
    "frozen BatchNorm": (r"\bfreez|\bfrozen\b", r"Once the BatchNorm is \*frozen\*"),
    "accumulator": (r"\baccumulators?\b", r"a 32-bit \*accumulator\*"),
    "requantization": (r"\brequantiz", r"one \*requantization\* \(the step"),
    "multiplier M": (r"\bmultiplier\b", r"the \*multiplier\* `M`"),
    "parity": (r"\bparity\b", r"checks this \*parity\*"),
    "graph mode / eager mode": (r"graph mode|eager", r"in \*graph mode\*, the default"),
    "QDQ": (r"\bQDQ\b", r"The \*\*QDQ form\*\*"),
    "LSQ": (r"\bLSQ\b|learned step", r"\*Learned Step Size Quantization\* \(LSQ|LSQ \(learned step size,"),
    "clip fraction": (r"clip fraction", r"\*\*clip fraction\*\*"),
    "flip rate": (r"flip rate", r"\*\*flip rate\*\*"),
    "oscillation": (r"oscillat", r"are \*oscillating\*"),
}


def _sections(text: str, first: int, last: int) -> str:
    """Sections ``first``..``last`` of a page whose sections are headed ``## N. ...``."""
    starts = {int(m.group(1)): m.start() for m in re.finditer(r"^## (\d+)\. ", text, flags=re.M)}
    end = starts.get(last + 1)
    if end is None:
        end = re.search(r"^## (?!\d)", text[starts[last]:], flags=re.M).start() + starts[last]
    return text[starts[first]:end]


def reading_order() -> list[tuple[str, str]]:
    """(name, prose) of each step of the README's reading order."""
    concepts = (DOCS / "concepts.md").read_text()
    exercises = DOCS / "exercises"
    steps = [
        ("concepts.md 1-7", _sections(concepts, 1, 7)),
        ("tutorial.md", (DOCS / "tutorial.md").read_text()),
        ("concepts.md 8-9", _sections(concepts, 8, 9)),
        ("getting_started.md", (DOCS / "getting_started.md").read_text()),
        ("exercises/README.md", (exercises / "README.md").read_text()),
    ]
    steps += [(f"exercises/{p.name}", p.read_text()) for p in sorted(exercises.glob("ex*.py"))]
    steps.append(("code_reading.md", (DOCS / "code_reading.md").read_text()))
    return [(name, _prose(text)) for name, text in steps]


def _prose(text: str) -> str:
    """The text a reader meets as explanation: without code blocks, a contents list, and
    quoted section titles of other pages ("Fake quantization" in a pointer to
    docs/numerics.md). Headings stay, as places; ``_paragraphs`` does not match them (the
    section under a heading defines what the heading names)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"^\d+\. \[.*$", "", text, flags=re.M)
    text = re.sub(r"^(#+ .*)$", r"\n\1\n", text, flags=re.M)
    return re.sub(r'"[^"\n]*"', "", text)


@functools.cache
def _paragraphs() -> tuple[tuple[str, str], ...]:
    """(where: the step and its current heading, text) of each prose paragraph, in order."""
    paragraphs = []
    for name, prose in reading_order():
        where = name
        for paragraph in re.split(r"\n\s*\n", prose):
            heading = re.match(r"#+ (.*)", paragraph.strip())
            if heading:
                where = f"{name}, {heading.group(1)}"
            elif paragraph.strip():
                paragraphs.append((where, paragraph))
    return tuple(paragraphs)


@functools.cache
def checklist() -> list[tuple[str, int, str, int, str]]:
    """(term, paragraph of first use, where, paragraph of definition, where) for each term."""
    paragraphs = _paragraphs()
    rows = []
    for term, (use, definition) in GLOSSARY.items():
        first_use = next(i for i, (_, p) in enumerate(paragraphs) if re.search(use, p, flags=re.I))
        definition = definition.replace(" ", r"\s+")  # a definition may wrap across lines
        defined = [i for i, (_, p) in enumerate(paragraphs) if re.search(definition, p, flags=re.I)]
        assert defined, f"{term}: no paragraph matches its definition pattern {definition!r}"
        rows.append((term, first_use, paragraphs[first_use][0], defined[0], paragraphs[defined[0]][0]))
    return rows


def test_the_readme_lists_the_reading_order_and_every_step_exists():
    readme = (ROOT / "README.md").read_text()
    path = readme[readme.index("## Learning quantization with qatcore"):readme.index("## What is here")]
    order = ["docs/concepts.md`, sections 1-7", "docs/tutorial.md", "docs/concepts.md`, sections 8-9",
             "docs/getting_started.md", "docs/exercises/", "docs/code_reading.md"]
    positions = [path.index(step) for step in order]
    assert positions == sorted(positions)
    assert all(step for _, step in reading_order())


@pytest.mark.parametrize("term", list(GLOSSARY))
def test_every_term_is_defined_before_its_first_use(term):
    row = next(r for r in checklist() if r[0] == term)
    _, first_use, used_in, defined_at, defined_in = row
    paragraphs = _paragraphs()
    assert first_use >= defined_at, (
        f"{term!r} is used in {used_in} (paragraph: {paragraphs[first_use][1][:200]!r}) before its "
        f"definition in {defined_in} (paragraph: {paragraphs[defined_at][1][:200]!r})")


def test_print_the_checklist():
    """The reviewer's checklist (``-s`` shows it): term, where defined, where first used."""
    rows = checklist()
    for term, _, used_in, _, defined_in in rows:
        print(f"| {term} | {defined_in} | {used_in} |")
    assert len(rows) == len(GLOSSARY)


def test_pointers_to_concepts_sections_name_existing_sections():
    """A quoted section title after docs/concepts.md ("5. The straight-through estimator")
    names a section that exists, so renumbering the page cannot leave stale pointers."""
    headings = re.findall(r"^## (.*)$", (DOCS / "concepts.md").read_text(), flags=re.M)
    pointers = []
    for path in sorted(DOCS.rglob("*")):
        if path.suffix in (".md", ".py"):
            text = path.read_text()
            for pointer in re.finditer(r"concepts\.md[`,;\s]+((?:and\s+)?\"\d+\. [^\"]+\"[\s,]*)+", text):
                pointers += [(path.name, title) for title in re.findall(r"\"(\d+\. [^\"]+)\"", pointer.group(0))]
    assert pointers
    for name, title in pointers:
        assert any(h.startswith(title.replace("\n", " ")) for h in headings), (name, title)
