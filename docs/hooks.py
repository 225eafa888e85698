"""MkDocs hook (mkdocs.yml: ``hooks``): render the Sphinx roles of the numpydoc docstrings.

mkdocstrings prints roles such as ``:meth:`forward``` or ``:class:`~nbbn.BatchNorm``` as
``:meth:<code>forward</code>``; this drops the role (and the ``~``) and keeps the code.
mkdocs.yml keeps this file out of the site (``exclude_docs``).
"""
import re

_SPHINX_ROLE = re.compile(r":(?:py:)?(?:meth|func|class|mod|attr|obj|data|exc):<code>~?")


def on_page_content(html, **kwargs):
    return _SPHINX_ROLE.sub("<code>", html)
