"""The documentation site (mkdocs.yml at the repository root, pages in docs/) builds with
``mkdocs build --strict`` (every page in the nav exists, every link and API reference
resolves, the numpydoc docstrings parse), and the HTML it writes is what the Markdown meant:
no list item swallowed into the paragraph before it, every formula handed to KaTeX, nothing
loaded from the network. tests/test_docs_browser.py checks the rendered pages in Chromium."""
import hashlib
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "mkdocs.yml"
KATEX = ROOT / "docs" / "assets" / "katex"
FONTS = ROOT / "docs" / "assets" / "fonts"


def missing_docs_tools():
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python",
                   "pymdownx.arithmatex"):
        try:
            __import__(module)
        except ImportError:
            return module
    return None


needs_docs_tools = pytest.mark.skipif(
    missing_docs_tools() is not None,
    reason=f"the docs tools are not installed ({missing_docs_tools()} missing): "
           "pip install '.[docs]'")

_BUILT = {}


def build_site(tmp_path_factory):
    """Build the site once per test session (shared with tests/test_docs_browser.py), from a
    working directory outside the repository, as ``mkdocs build --strict -f mkdocs.yml``.
    Returns (the site folder, the finished mkdocs process)."""
    if "site" not in _BUILT:
        work = tmp_path_factory.mktemp("docs")
        site = work / "site"
        env = dict(os.environ, NO_MKDOCS_2_WARNING="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        done = subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(CONFIG),
             "-d", str(site)], capture_output=True, text=True, timeout=300, cwd=work, env=env)
        _BUILT["site"] = (site, done)
    return _BUILT["site"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site, done = build_site(tmp_path_factory)
    assert done.returncode == 0, done.stdout + done.stderr
    return site


def site_pages(site):
    """The pages of the built site: {'index.html': path, 'api/index.html': path, ...}."""
    return {p.relative_to(site).as_posix(): p for p in sorted(site.rglob("*.html"))
            if p.name != "404.html"}


# --- what the Markdown meant, read from the HTML ---------------------------------------------

#: A line that starts like a list item ("2. ", "3) ", "- ", "* ", "+ ").
_LIST_MARKER = re.compile(r"^\s*(?:\d{1,3}[.)]|[-*+])\s+\S")
#: TeX left as text: \( \) \[ \] \begin{...} \frac..., $$, or $...$ around something.
_RAW_TEX = re.compile(r"\\[()\[\]]|\\begin\{|\\[a-zA-Z]{2,}\{|\$\$|\$[^\s$][^$\n]*\$")
_VERBATIM = {"code", "pre", "script", "style", "kbd", "samp", "textarea", "svg"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
         "source", "track", "wbr"}


class _PageChecker(HTMLParser):
    """Collects, for one page, the paragraphs' text (code spans as a placeholder) and the
    text outside code and formulas, and the formulas arithmatex marked."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack = []            # open elements: (tag, is_formula)
        self.paragraphs = []       # text of each <p>, code spans replaced by "code"
        self.loose_text = []       # text outside code, <pre>, scripts and formulas
        self.formulas = []         # (tag, text) of each .arithmatex element
        self._p = None
        self._formula = None

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            return
        classes = (dict(attrs).get("class") or "").split()
        is_formula = "arithmatex" in classes and self._formula is None
        self.stack.append((tag, is_formula))
        if is_formula:
            self._formula = [tag, ""]
        if tag == "p" and not self._in(_VERBATIM):
            self._p = []
        elif tag == "code" and self._p is not None:
            self._p.append("code")

    def handle_endtag(self, tag):
        if tag in _VOID or not any(t == tag for t, _ in self.stack):
            return
        while self.stack:
            open_tag, is_formula = self.stack.pop()
            if is_formula:
                self.formulas.append(tuple(self._formula))
                self._formula = None
            if open_tag == "p" and self._p is not None:
                self.paragraphs.append("".join(self._p))
                self._p = None
            if open_tag == tag:
                break

    def handle_data(self, data):
        if self._formula is not None:
            self._formula[1] += data
            return
        if self._in(_VERBATIM):
            return
        self.loose_text.append(data)
        if self._p is not None:
            self._p.append(data)

    def _in(self, tags):
        return any(t in tags for t, _ in self.stack)


def check_page(html):
    """The rendering problems of one built page, as a list of strings (empty: none)."""
    page = _PageChecker()
    page.feed(html)
    page.close()
    problems = []
    for text in page.paragraphs:
        for line in text.splitlines():
            if _LIST_MARKER.match(line):
                problems.append(f"a list item run into a paragraph: {line.strip()[:80]!r} "
                                "(indent the item's continuation lines and blocks by 4 spaces, "
                                "and leave a blank line before the list)")
    for text in page.loose_text:
        for match in _RAW_TEX.finditer(text):
            around = text[max(0, match.start() - 30):match.end() + 30].replace("\n", " ")
            problems.append(f"TeX outside a formula: {match.group()!r} in {around!r}")
    for tag, tex in page.formulas:
        tex = tex.strip()
        if not ((tex.startswith(r"\(") and tex.endswith(r"\)"))
                or (tex.startswith(r"\[") and tex.endswith(r"\]"))):
            problems.append(f"a formula docs/assets/math.js cannot read: <{tag}> {tex[:60]!r}")
    return problems


def page_formulas(html):
    page = _PageChecker()
    page.feed(html)
    return page.formulas


def test_check_page_finds_swallowed_list_items_and_raw_tex():
    """The checker itself, on the HTML Python-Markdown made of the broken docs/index.md (list
    items after an under-indented block ran into the paragraph before them)."""
    broken = ("<p>never used: it loses every digit.\n2. <strong>Normalization</strong> With "
              "the biased</p><p>c = −a·Σg/n;\n- <strong>eval</strong> (frozen)</p>"
              "<p>mean $m_b$ and \\(x\\) and</p><pre><code>1. $a$ \\(b\\)</code></pre>"
              "<p>- <code>x</code> y</p>")
    problems = check_page(broken)
    assert [p.split(":")[0] for p in problems] == ["a list item run into a paragraph"] * 3 + [
        "TeX outside a formula"] * 3, problems       # $m_b$, \( and \)
    fine = ("<ol><li><p>Statistics</p></li><li><p>A code span may wrap: <code>a\n2. x"
            "</code></p></li></ol><p>a <span class=\"arithmatex\">\\(x_1\\)</span> b "
            "1.5 - 2 and x - y\n+1 point</p><div class=\"arithmatex\">\\[\n\\sum x\n\\]</div>")
    assert check_page(fine) == []


@needs_docs_tools
def test_check_page_flags_markdown_that_python_markdown_misreads():
    """The numbered list of the old docs/index.md: continuation lines indented by 3 spaces
    and a code block by 7 inside the items. Python-Markdown (unlike GitHub) wants 4 and 8, so
    the list ended after item 1 and items 2 and 3 ran into the paragraphs before them."""
    import markdown
    old = ("1. **Statistics.** Chan's formula:\n\n       n = n_a + n_b\n\n"
           "   All of it in float64.\n2. **Normalization.** Per channel\n\n"
           "       y = x·scale + shift\n\n   computed in float64.\n3. **Running statistics**\n")
    html = markdown.markdown(old, extensions=["pymdownx.superfences", "pymdownx.arithmatex"],
                             extension_configs={"pymdownx.arithmatex": {"generic": True}})
    assert len(check_page(html)) == 2, html
    new = ("1.  **Statistics.** Chan's formula:\n\n    $$\n    n = n_a + n_b\n    $$\n\n"
           "    All of it in float64.\n\n2.  **Normalization.** Per channel $y = x s + b$,\n"
           "    computed in float64.\n\n3.  **Running statistics**\n")
    html = markdown.markdown(new, extensions=["pymdownx.superfences", "pymdownx.arithmatex"],
                             extension_configs={"pymdownx.arithmatex": {"generic": True}})
    assert check_page(html) == [] and html.count("<li>") == 3 and len(page_formulas(html)) == 2


@needs_docs_tools
def test_mkdocs_build_strict(site):
    assert (site / "index.html").is_file() and (site / "img" / "demo.png").is_file()
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("nbbn.BatchNorm", "nbbn.batch_norm", "nbbn.functional.batch_norm_backward",
                 "nbbn.programs.mlp.MLP"):
        assert f'id="{name}"' in api, name
    assert ":meth:" not in api and ":class:" not in api   # Sphinx roles rendered as code
    started = (site / "getting-started" / "index.html").read_text(encoding="utf-8")
    assert "heading for 2 and 1" in started  # nbbn/programs/example.py, pulled in by the snippet
    # only pages and their assets: not the hook, the KaTeX notes, caches
    assert not list(site.rglob("*.py")) and not list(site.rglob("__pycache__"))
    assert not (site / "assets" / "katex" / "README.txt").exists()
    assert not (site / "assets" / "katex" / "SHA256SUMS").exists()
    assert not (site / "assets" / "fonts" / "README.txt").exists()
    assert not (site / "assets" / "fonts" / "SHA256SUMS").exists()
    for asset in ("katex/katex.min.js", "katex/katex.min.css", "katex/LICENSE", "math.js",
                  "extra.css", "fonts/roboto/wght.css", "fonts/roboto-mono/LICENSE"):
        assert (site / "assets" / asset).is_file(), asset


@needs_docs_tools
def test_pages_render_lists_and_formulas(site):
    problems = {name: check_page(path.read_text(encoding="utf-8"))
                for name, path in site_pages(site).items()}
    assert {name: p for name, p in problems.items() if p} == {}
    # the formulas of the home page (the math) and of the feature pages are TeX for KaTeX
    for name in ("index.html", "renorm/index.html", "fold/index.html"):
        formulas = page_formulas((site / name).read_text(encoding="utf-8"))
        assert any(tag == "div" for tag, _ in formulas), f"{name}: no displayed formula"


@needs_docs_tools
def test_site_loads_nothing_from_the_network(site):
    """Scripts, stylesheets, fonts and images all come from the site itself (no CDN, no
    Google Fonts), and each page loads the local KaTeX and math.js."""
    external = re.compile(
        r"""<(?:script|link|img|iframe|source)\b[^>]*?\b(?:src|href)="(?:https?:)?//""")
    for name, path in site_pages(site).items():
        html = path.read_text(encoding="utf-8")
        assert not external.search(html), f"{name}: {external.search(html).group()}"
        assert re.search(r'<script src="[./]*assets/katex/katex\.min\.js"', html), name
        assert re.search(r'<script src="[./]*assets/math\.js"', html), name
    for css in site.rglob("*.css"):
        assert not re.search(r"url\(\s*['\"]?(?:https?:)?//|@import", css.read_text("utf-8")), css


def _checked_sums(folder):
    """The files SHA256SUMS lists in ``folder``, each checked against its digest."""
    listed = {}
    for line in filter(None, (folder / "SHA256SUMS").read_text().split("\n")):
        digest, name = line.split(maxsplit=1)
        listed[name.lstrip("*")] = digest
    for name, digest in listed.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    return set(listed)


def test_vendored_katex_is_intact():
    """docs/assets/katex/ is KaTeX as published (SHA256SUMS, see README.txt there), and every
    font its stylesheet asks for first (woff2) is there."""
    listed = _checked_sums(KATEX)
    assert {"katex.min.js", "katex.min.css", "LICENSE"} <= listed
    css = (KATEX / "katex.min.css").read_text()
    woff2 = set(re.findall(r"url\((fonts/[^)]+\.woff2)\)", css))
    assert woff2 and woff2 == {f"fonts/{p.name}" for p in (KATEX / "fonts").iterdir()}
    assert woff2 <= listed


def test_vendored_fonts_are_intact_and_used():
    """docs/assets/fonts/ is Roboto and Roboto Mono as published (SHA256SUMS, see README.txt
    there): every file their stylesheets name is there and nothing else; mkdocs.yml loads the
    stylesheets and extra.css makes the families the site's text and code fonts."""
    listed = _checked_sums(FONTS)
    config = (ROOT / "mkdocs.yml").read_text()
    extra = (ROOT / "docs" / "assets" / "extra.css").read_text()
    for family, folder in (("Roboto Variable", "roboto"), ("Roboto Mono Variable", "roboto-mono")):
        named = set()
        for sheet in ("wght.css", "wght-italic.css"):
            assert f"- assets/fonts/{folder}/{sheet}" in config, sheet
            css = (FONTS / folder / sheet).read_text()
            assert set(re.findall(r"font-family: '([^']+)'", css)) == {family}
            named |= {f"{folder}/{url[2:]}" for url in re.findall(r"url\((\./files/[^)]+)\)", css)}
        shipped = {f"{folder}/files/{p.name}" for p in (FONTS / folder / "files").iterdir()}
        assert named and named == shipped, folder
        assert shipped | {f"{folder}/LICENSE", f"{folder}/wght.css", f"{folder}/wght-italic.css"} \
            <= listed
    assert re.search(r'--md-text-font: "Roboto Variable"', extra)
    assert re.search(r'--md-code-font: "Roboto Mono Variable"', extra)


def test_api_page_lists_every_public_name():
    import nbbn
    import nbbn.functional
    import nbbn.programs.mlp
    entries = {line[4:].strip() for line in (ROOT / "docs" / "api.md").read_text().splitlines()
               if line.startswith("::: ")}
    missing = [f"nbbn.{n}" for n in nbbn.__all__ if f"nbbn.{n}" not in entries]
    missing += [f"nbbn.functional.{n}" for n in nbbn.functional.__all__
                if f"nbbn.functional.{n}" not in entries and f"nbbn.{n}" not in entries]
    missing += [f"nbbn.programs.mlp.{n}" for n in nbbn.programs.mlp.__all__
                if f"nbbn.programs.mlp.{n}" not in entries]
    assert not missing, f"docs/api.md lacks ::: entries for {missing}"


def test_nav_lists_every_page():
    config = CONFIG.read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert [p for p in pages if f": {p}" not in config] == []
    assert not list((ROOT / "docs").rglob("mkdocs.yml"))   # one config, at the root
    assert not list((ROOT / "docs").glob("*/**/*.md"))      # no page outside the nav
