// Typesets the formulas of the page with the KaTeX copy in assets/katex/ (no network).
// pymdownx.arithmatex (generic mode) leaves each formula as TeX between its delimiters:
// <span class="arithmatex">\(...\)</span> inline, <div class="arithmatex">\[...\]</div>
// displayed. A formula KaTeX cannot parse is shown as its source, in red, with the error
// as a tooltip (throwOnError: false), and tests/test_docs_browser.py fails on it.
(function () {
  "use strict";
  var DELIMITED = /^\\\(([\s\S]*)\\\)$|^\\\[([\s\S]*)\\\]$/;

  function typeset(root) {
    var formulas = root.querySelectorAll(".arithmatex");
    for (var i = 0; i < formulas.length; i++) {
      var el = formulas[i];
      if (el.querySelector(".katex")) continue;           // already typeset
      var tex = el.textContent.trim();
      var m = DELIMITED.exec(tex);
      if (m) tex = m[1] !== undefined ? m[1] : m[2];
      katex.render(tex, el, {
        displayMode: el.tagName === "DIV",
        throwOnError: false,
      });
    }
  }

  if (typeof document$ !== "undefined") {
    // mkdocs-material: runs on the first load and after every instant navigation
    document$.subscribe(function () { typeset(document.body); });
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { typeset(document.body); });
  } else {
    typeset(document.body);
  }
})();
