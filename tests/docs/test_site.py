"""The documentation's own checks (tools/docs/check_site.py) and diagrams (tools/docs/diagrams.py).

The docs session builds the site and runs check_site on it; these tests keep the source checks in the main
suite (a page added by anyone with a code line past 88 columns fails here too) and show that each check can
fail.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "docs"))

import check_site  # noqa: E402
import diagrams  # noqa: E402


def config_for(tmp_path: Path) -> check_site.Config:
    docs = tmp_path / "docs"
    (docs / "examples").mkdir(parents=True)
    return check_site.Config(docs, "https://example.org/volley/", "https://github.com/volley-project/volley",
                             (docs / "examples", tmp_path), ("index.md",))


def test_the_documentation_passes_its_source_checks() -> None:
    config = check_site.load_config()
    assert config.site_url.endswith("/") and config.repo_url
    assert check_site.check_sources(config) == []


def test_every_page_of_the_docs_folder_is_in_the_nav() -> None:
    config = check_site.load_config()
    pages = {str(p.relative_to(config.docs_dir)) for p in check_site.pages(config)}
    assert pages <= set(config.nav_pages), f"not in mkdocs.yml nav: {sorted(pages - set(config.nav_pages))}"


def test_a_long_code_line_is_found_in_a_page_and_in_an_included_file(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    (config.docs_dir / "examples" / "long.py").write_text("x = 1\n" + "y = '" + "a" * 90 + "'\n")
    (config.docs_dir / "index.md").write_text(
        "# Page\n\n```python\nshort = 1\n" + "z" * 89 + "\n```\n\n"
        "!!! note\n    ```bash\n    " + "w" * 88 + "\n    ```\n\n"
        '```python\n--8<-- "long.py"\n```\n\nprose ' + "p" * 100 + "\n"
    )
    problems = check_site.check_code_width(config)
    included = f"{config.docs_dir}/examples/long.py:2 (in docs/index.md)"
    assert [p.where for p in problems] == ["docs/index.md:5", included]


def test_a_link_into_the_repository_must_name_what_exists(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    (tmp_path / "examples" / "two_node").mkdir(parents=True)
    (tmp_path / "README.md").write_text("")
    repo = config.repo_url
    (config.docs_dir / "index.md").write_text(
        f"[ok]({repo}/tree/main/examples/two_node) [ok]({repo}/blob/main/README.md#top)\n"
        f"[gone]({repo}/blob/main/dashboards/volley.json)\n"
        f"[folder as file]({repo}/blob/main/examples/two_node)\n"
        f"[other branch]({repo}/blob/dev/README.md)\n"
    )
    problems = check_site.check_repo_links(config, root=tmp_path)
    assert [p.where for p in problems] == ["docs/index.md:2", "docs/index.md:3", "docs/index.md:4"]
    assert "dashboards/volley.json is not a file" in problems[0].what


def test_the_built_site_checks_catch_an_empty_sitemap_a_relative_404_and_missing_diagrams(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitemap.xml").write_text('<?xml version="1.0"?><urlset xmlns="http://www.sitemaps.org/schemas/'
                                      'sitemap/0.9"></urlset>')
    (site / "404.html").write_text('<link href="assets/main.css"><script src="/volley/assets/ok.js"></script>')
    problems = [str(p) for p in check_site.check_site(site, config)]
    assert any(p.startswith("sitemap.xml: 0 pages") for p in problems)
    assert any("404.html: 'assets/main.css' is relative" in p for p in problems)
    assert not any("ok.js" in p for p in problems)
    assert sum("not in the built site" in p for p in problems) == len(check_site.DIAGRAMS)


@pytest.mark.parametrize("name", sorted(diagrams.DIAGRAMS))
def test_each_diagram_is_an_svg_with_a_title_and_the_words_it_must_show(name: str) -> None:
    svg = diagrams.DIAGRAMS[name]()
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    ns = {"s": "http://www.w3.org/2000/svg"}
    assert root.find("s:title", ns) is not None and root.find("s:desc", ns) is not None
    words = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    expected = {
        "diagrams/message-path.svg": ["consume", "decode", "handler", "produce", "confirmed", "ack", "retry",
                                      "dead letter", "give back"],
        "diagrams/kafka-commit.svg": ["committed: 43", "unbroken run", "not committed yet"],
    }[name]
    for word in expected:
        assert word in words, f"{name} does not show {word!r}"
    assert "http" not in svg.replace("http://www.w3.org/2000/svg", ""), "a diagram must not load anything"


def test_the_diagrams_are_shown_by_pages() -> None:
    config = check_site.load_config()
    text = "".join(p.read_text() for p in check_site.pages(config))
    for name in diagrams.DIAGRAMS:
        assert f"{name})" in text, f"no page shows {name}"
