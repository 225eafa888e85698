"""The documentation site builds with ``mkdocs build --strict`` (every page in the nav
exists, every link and API reference resolves, the numpydoc docstrings parse)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _missing_docs_tools():
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            __import__(module)
        except ImportError:
            return module
    return None


@pytest.mark.skipif(_missing_docs_tools() is not None,
                    reason=f"the docs tools are not installed ({_missing_docs_tools()} missing): "
                           "pip install '.[docs]'")
def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "docs" / "mkdocs.yml"),
         "-d", str(site)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "index.html").is_file() and (site / "img" / "demo.png").is_file()
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("nbbn.BatchNorm", "nbbn.batch_norm", "nbbn.functional.batch_norm_backward",
                 "nbbn.mlp.MLP"):
        assert f'id="{name}"' in api, name
    assert ":meth:" not in api and ":class:" not in api   # Sphinx roles rendered as code
    started = (site / "getting-started" / "index.html").read_text(encoding="utf-8")
    assert "heading for 2 and 1" in started  # nbbn/example.py, pulled in by the snippet
    assert not (site / "mkdocs.yml").exists() and not (site / "hooks.py").exists()
    shutil.rmtree(site)


def test_api_page_lists_every_public_name():
    import nbbn
    import nbbn.functional
    import nbbn.mlp
    entries = {line[4:].strip() for line in (ROOT / "docs" / "api.md").read_text().splitlines()
               if line.startswith("::: ")}
    missing = [f"nbbn.{n}" for n in nbbn.__all__ if f"nbbn.{n}" not in entries]
    missing += [f"nbbn.functional.{n}" for n in nbbn.functional.__all__
                if f"nbbn.functional.{n}" not in entries and f"nbbn.{n}" not in entries]
    missing += [f"nbbn.mlp.{n}" for n in nbbn.mlp.__all__ if f"nbbn.mlp.{n}" not in entries]
    assert not missing, f"docs/api.md lacks ::: entries for {missing}"


def test_nav_lists_every_page():
    nav = (ROOT / "docs" / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert [p for p in pages if f": {p}" not in nav] == []
