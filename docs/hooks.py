"""MkDocs hook: build the site from the pages in docs/ itself.

MkDocs refuses a ``docs_dir`` that is the folder of its config file, and the config must
live in docs/ (the repository's top level has no room for it). So mkdocs.yml names a child
folder (``img``, which passes that check) and this hook, once the config is validated,
points ``docs_dir`` at docs/ itself; ``exclude_docs`` in mkdocs.yml keeps this file and
the config out of the site, and ``site_dir`` lies outside docs/. It also roots the
snippets extension (``--8<-- "nbbn/example.py"``) at the repository, whatever the working
directory. And it renders the Sphinx roles of the numpydoc docstrings
(``:meth:`forward```, ``:class:`~nbbn.BatchNorm```) as plain code, which mkdocstrings
would otherwise print literally.
"""
import os
import re

_SPHINX_ROLE = re.compile(r":(?:py:)?(?:meth|func|class|mod|attr|obj|data|exc):<code>~?")


def on_config(config):
    docs = os.path.dirname(os.path.abspath(config.config_file_path))
    config["docs_dir"] = docs
    config["mdx_configs"].setdefault("pymdownx.snippets", {})["base_path"] = [
        os.path.dirname(docs)]
    return config


def on_page_content(html, **kwargs):
    return _SPHINX_ROLE.sub("<code>", html)
