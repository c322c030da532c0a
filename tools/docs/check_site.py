"""Checks of the documentation that ``mkdocs build --strict`` does not make.

    python tools/docs/check_site.py            # the sources: docs/*.md and the files they include
    python tools/docs/check_site.py site/      # ... and the built site in site/

Sources: every line of every code block (snippet includes resolved) fits the code column, 88 characters, so
that nothing is cut off on a desktop; every link to a file of the repository (``repo_url`` + ``/blob/main/...``
or ``/tree/main/...``) names a file or folder that exists. Built site: the sitemap lists every page under
``site_url``, the 404 page loads its assets from under the site's path (it is served at any depth), and the
diagrams drawn at build time are there and shown by a page.
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
MAX_CODE_COLUMNS = 88
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
SNIPPET = re.compile(r"""^\s*-{1,}8<-{1,}\s+["'](?P<path>[^"':]+)(?::[^"']*)?["']\s*$""")
LINK = re.compile(r"\]\((?P<url>[^)\s]+)(?:\s+\"[^\"]*\")?\)|<(?P<auto>https?://[^>\s]+)>|href=\"(?P<href>[^\"]+)\"")


@dataclass(frozen=True)
class Problem:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass(frozen=True)
class Config:
    docs_dir: Path
    site_url: str
    repo_url: str
    snippet_bases: tuple[Path, ...]
    nav_pages: tuple[str, ...]


def load_config(root: Path = ROOT) -> Config:
    """The few settings of mkdocs.yml these checks need (read as text: its !relative tags need mkdocs itself)."""
    text = (root / "mkdocs.yml").read_text()

    def setting(name: str) -> str:
        match = re.search(rf"^{name}:\s*(\S+)\s*$", text, flags=re.MULTILINE)
        return match.group(1).strip("'\"") if match else ""

    docs_dir = root / (setting("docs_dir") or "docs")
    bases = tuple(root / m.strip() for m in re.findall(r"!relative \$config_dir/?([^,\]\s]*)", text))
    pages = tuple(re.findall(r"^\s*-\s*(?:.*:\s+)?([\w./-]+\.md)\s*$", text, flags=re.MULTILINE))
    return Config(docs_dir, setting("site_url"), setting("repo_url"), bases or (docs_dir,), pages)


def resolve_snippet(path: str, config: Config) -> Path | None:
    for base in config.snippet_bases:
        candidate = base / path
        if candidate.is_file():
            return candidate
    return None


def code_lines(page: Path, config: Config) -> Iterator[tuple[str, str]]:
    """(where, line) of every line inside a fenced code block of ``page``, with included files expanded."""
    fence: str | None = None
    indent = 0
    rel = page.relative_to(config.docs_dir.parent)
    for number, raw in enumerate(page.read_text().splitlines(), 1):
        opening = FENCE.match(raw)
        if fence is None:
            if opening:
                fence, indent = opening.group("fence"), len(opening.group("indent"))
            continue
        stripped = raw.strip()
        if stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}:
            fence = None
            continue
        snippet = SNIPPET.match(raw)
        if snippet:
            included = resolve_snippet(snippet.group("path"), config)
            if included is None:
                continue  # mkdocs --strict (check_paths) reports it
            where = included.relative_to(ROOT) if included.is_relative_to(ROOT) else included
            for inner, line in enumerate(included.read_text().splitlines(), 1):
                yield f"{where}:{inner} (in {rel})", line
            continue
        yield f"{rel}:{number}", raw[indent:] if raw[:indent].strip() == "" else raw


def pages(config: Config) -> list[Path]:
    examples = config.docs_dir / "examples"
    return sorted(p for p in config.docs_dir.rglob("*.md") if not p.is_relative_to(examples))


def check_code_width(config: Config) -> list[Problem]:
    return [Problem(where, f"code line of {len(line)} characters (at most {MAX_CODE_COLUMNS}): {line[:60]}...")
            for page in pages(config) for where, line in code_lines(page, config)
            if len(line.rstrip()) > MAX_CODE_COLUMNS]


def check_repo_links(config: Config, root: Path = ROOT) -> list[Problem]:
    """Links into the repository (repo_url/blob/main/PATH, repo_url/tree/main/PATH) must name what exists."""
    if not config.repo_url:
        return [Problem("mkdocs.yml", "no repo_url")]
    prefix = config.repo_url.rstrip("/") + "/"
    problems = []
    for page in pages(config):
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for match in LINK.finditer(line):
                url = match.group("url") or match.group("auto") or match.group("href") or ""
                if not url.startswith(prefix):
                    continue
                rest = url[len(prefix):].split("#", 1)[0]
                kind, _, tail = rest.partition("/")
                branch, _, path = tail.partition("/")
                if kind not in {"blob", "tree"} or branch != "main" or not path:
                    problems.append(Problem(f"{page.relative_to(root)}:{number}",
                                            f"{url}: link to {prefix}blob/main/PATH or {prefix}tree/main/PATH"))
                    continue
                target = root / path
                exists = target.is_file() if kind == "blob" else target.is_dir()
                if not exists:
                    problems.append(Problem(f"{page.relative_to(root)}:{number}",
                                            f"{url}: {path} is not a {'file' if kind == 'blob' else 'folder'} "
                                            "of the repository"))
    return problems


def check_sources(config: Config) -> list[Problem]:
    problems = check_code_width(config) + check_repo_links(config)
    if not config.site_url.endswith("/"):
        problems.append(Problem("mkdocs.yml", f"site_url {config.site_url!r} must be set and end with '/'"))
    return problems


# ------------------------------------------------------------------------------------------------ the built site

DIAGRAMS = ("diagrams/message-path.svg", "diagrams/kafka-commit.svg")


def check_site(site: Path, config: Config) -> list[Problem]:
    problems: list[Problem] = []
    base_path = urlparse(config.site_url).path or "/"

    sitemap = site / "sitemap.xml"
    locations = []
    if sitemap.is_file():
        tree = ET.parse(sitemap)
        locations = [el.text or "" for el in tree.iter() if el.tag.endswith("loc")]
    if len(locations) < len(config.nav_pages):
        problems.append(Problem("sitemap.xml", f"{len(locations)} pages listed, the nav has {len(config.nav_pages)}"))
    problems += [Problem("sitemap.xml", f"{loc} is not under {config.site_url}")
                 for loc in locations if not loc.startswith(config.site_url)]

    not_found = site / "404.html"
    if not not_found.is_file():
        problems.append(Problem("404.html", "missing"))
    else:
        html = not_found.read_text()
        for match in re.finditer(r'(?:href|src)="([^"#]+)"', html):
            url = match.group(1)
            if urlparse(url).scheme or url.startswith(("mailto:", "data:")):
                continue
            if not url.startswith(base_path):
                problems.append(Problem("404.html", f"{url!r} is relative: it breaks when the page is served "
                                        f"at a deeper path (expected it under {base_path})"))

    for page in sorted(site.rglob("*.html")):
        external = re.findall(r'<(?:link[^>]*rel="stylesheet"[^>]*href|script[^>]*src)="(https?://[^"]+)"',
                              page.read_text())
        if external:
            problems.append(Problem(str(page.relative_to(site)), f"loads {external[0]}: the site must work offline"))

    shown = "".join(p.read_text() for p in site.rglob("*.html"))
    for diagram in DIAGRAMS:
        path = site / diagram
        if not path.is_file():
            problems.append(Problem(diagram, "not in the built site"))
            continue
        try:
            root = ET.fromstring(path.read_text())
        except ET.ParseError as exc:
            problems.append(Problem(diagram, f"not valid SVG: {exc}"))
            continue
        if not root.tag.endswith("svg"):
            problems.append(Problem(diagram, f"root element is {root.tag}, not svg"))
        if Path(diagram).name not in shown:
            problems.append(Problem(diagram, "no page shows it"))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", type=Path, help="a built site to check as well")
    args = parser.parse_args(argv)
    config = load_config()
    problems = check_sources(config)
    if args.site is not None:
        problems += check_site(args.site, config)
    for problem in problems:
        print(f"check_site: {problem}", file=sys.stderr)
    print(f"check_site: {len(pages(config))} pages, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
