"""The documentation site as a reader sees it: every page of the built site, served from
127.0.0.1, opened in headless Chromium (driven over the DevTools protocol through a pipe, no
port and no extra package), checked and screenshotted.

On every page: every formula typeset by KaTeX (no raw TeX left in the text, no KaTeX error,
KaTeX's fonts loaded from the site), no table or displayed formula wider than the content
column at 1280 px (every column visible) and none cut off at 420 px (they scroll inside the
column), nothing requested outside the site, no script error or failed request, and a
screenshot that is not blank. Skipped where Chromium is missing (Debian: ``apt-get install
chromium``; or point ``CHROMIUM`` at a Chrome/Chromium binary). ``NBBN_DOCS_SCREENSHOTS=DIR``
keeps the screenshots there."""
import base64
import functools
import http.server
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_docs import build_site, needs_docs_tools, site_pages


def _find_chromium():
    candidates = [os.environ.get("CHROMIUM", "")]
    candidates += [shutil.which(name) or "" for name in
                   ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


CHROMIUM = _find_chromium()
DESKTOP = (1280, 900)
#: The families of the fonts the site ships (docs/assets/fonts/, docs/assets/katex/fonts/):
#: every glyph on every page must come from one of them, so that the pages are laid out
#: alike on every machine, whatever fonts it has.
SHIPPED_FONTS = ("Roboto", "Roboto Mono", "KaTeX_")
NARROW = (420, 800)

pytestmark = [
    needs_docs_tools,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get "
                       "install chromium; or set CHROMIUM to a Chrome/Chromium binary)"),
    pytest.mark.skipif(sys.platform == "win32", reason="drives Chromium through POSIX pipes"),
]


class Browser:
    """Headless Chromium, one tab, spoken to over --remote-debugging-pipe (DevTools protocol
    messages as JSON, each ended by a NUL byte: the browser reads fd 3 and writes fd 4)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--mute-audio", "--hide-scrollbars",
             "--force-device-scale-factor=1", "--remote-debugging-pipe"]
    # puts the pipe ends on fds 3 and 4, then becomes the browser
    LAUNCHER = ("import fcntl, os, sys\n"
                "r, w = (fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3])\n"
                "os.dup2(r, 3)\nos.dup2(w, 4)\nos.execv(sys.argv[3], sys.argv[3:])\n")

    def __init__(self, binary, profile, log):
        to_browser, self._out = os.pipe()
        self._in, from_browser = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.LAUNCHER, str(to_browser), str(from_browser), binary,
             *self.FLAGS, f"--user-data-dir={profile}", f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
             "about:blank"],
            pass_fds=(to_browser, from_browser), stdin=subprocess.DEVNULL,
            stdout=log, stderr=log)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._id = 0
        self.events = []
        self.requests = []     # every URL the page asked for
        self.errors = []       # script exceptions, console errors, failed or refused requests
        try:
            target = next(t for t in self.call("Target.getTargets")["targetInfos"]
                          if t["type"] == "page")
            self.session = self.call("Target.attachToTarget", targetId=target["targetId"],
                                     flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Network", "Log", "DOM", "CSS"):
                self.tab(f"{domain}.enable")
        except BaseException:
            self.close()
            raise

    def _receive(self, deadline):
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise EOFError(f"Chromium exited (status {self.proc.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        message = json.loads(message)
        self._note(message)
        return message

    def _note(self, message):
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
            if not params["response"]["url"].endswith("/favicon.ico"):
                self.errors.append(f"HTTP {params['response']['status']}: "
                                   f"{params['response']['url']}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            self.errors.append(f"request failed: {params.get('errorText')}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append("script error: " + details.get("exception", {}).get(
                "description", details.get("text", "")))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            if "favicon.ico" not in params["entry"].get("url", ""):
                self.errors.append(f"console: {params['entry']['text']}")
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.errors.append("console.error: " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in params["args"]))

    def call(self, method, session=None, timeout=30, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._receive(deadline)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]
            self.events.append(answer)

    def tab(self, method, **params):
        return self.call(method, session=self.session, **params)

    def evaluate(self, expression, timeout=30):
        result = self.call("Runtime.evaluate", session=self.session, timeout=timeout,
                           expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"in the page: {result['exceptionDetails']}")
        return json.loads(result["result"]["value"])

    def open(self, url, size, timeout=30):
        self.tab("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1],
                 deviceScaleFactor=1, mobile=False)
        self.events.clear()
        navigation = self.tab("Page.navigate", url=url)
        assert "errorText" not in navigation, f"{url}: {navigation['errorText']}"
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._receive(deadline))

    def resize(self, size):
        self.tab("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1],
                 deviceScaleFactor=1, mobile=False)

    def platform_fonts(self):
        """``{font: text}``: every font Chromium drew text of the page with (the family
        name in the font file, and whether the page supplied it as a web font), each with
        a sample of the text drawn in it."""
        root = self.tab("DOM.getDocument", depth=-1)["root"]
        elements, stack = [], [root]
        while stack:
            node = stack.pop()
            attributes = node.get("attributes", [])
            classes = dict(zip(attributes[::2], attributes[1::2])).get("class", "").split()
            if node["nodeName"] in ("SCRIPT", "STYLE") or "katex-mathml" in classes:
                continue  # not drawn (KaTeX's MathML copy is for screen readers)
            children = node.get("children", [])
            text = " ".join(c["nodeValue"].strip() for c in children
                            if c["nodeType"] == 3 and c["nodeValue"].strip())
            if node["nodeType"] == 1 and text:
                elements.append((node["nodeId"], text))
            stack.extend(children)
        used = {}
        for node_id, text in elements:
            for font in self.tab("CSS.getPlatformFontsForNode", nodeId=node_id)["fonts"]:
                used.setdefault((font["familyName"], font["isCustomFont"]), text[:40])
        return used

    def screenshot(self):
        """The whole page, as PNG bytes."""
        height = self.tab("Page.getLayoutMetrics")["cssContentSize"]["height"]
        shot = self.tab("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                        clip={"x": 0, "y": 0, "width": DESKTOP[0], "height": height, "scale": 1})
        return base64.b64decode(shot["data"])

    def close(self):
        try:
            if self.proc.poll() is None:
                self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._out)
        os.close(self._in)


# Runs in the page once it has loaded: the formulas, the text, the fonts and the wide blocks.
_RENDERED = r"""(async () => {
  await document.fonts.ready;
  await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
  const content = document.querySelector(".md-content");
  const column = content.getBoundingClientRect();
  const formulas = [...document.querySelectorAll(".arithmatex")];
  const raw = [];
  const walker = document.createTreeWalker(content, NodeFilter.SHOW_TEXT);
  // the text a reader sees (KaTeX's MathML copy is for screen readers)
  while (walker.nextNode()) {
    const node = walker.currentNode;
    if (node.parentElement.closest("script, style, code, pre, kbd, .katex-mathml")) continue;
    if (/\\[()\[\]]|\\begin\{|\\[a-zA-Z]{2,}|\$\$|\$[^\s$][^$]*\$/.test(node.data))
      raw.push(node.data.trim().slice(0, 80));
  }
  const faces = [...document.fonts].filter(f => f.family.replace(/["']/g, "").startsWith("KaTeX"));
  const wide = [];
  for (const el of content.querySelectorAll("table, .katex-display")) {
    const box = el.getBoundingClientRect();
    const what = el.tagName === "TABLE"
      ? "table [" + [...el.querySelectorAll("th")].map(th => th.textContent.trim())
                        .join(", ").slice(0, 60) + "]"
      : "formula " + el.textContent.trim().slice(0, 40);
    if (box.left < column.left - 1 || box.right > column.right + 1)
      wide.push(`${what}: ${Math.round(box.left)}..${Math.round(box.right)} px, ` +
                `the column ${Math.round(column.left)}..${Math.round(column.right)}`);
    for (let up = el.parentElement; up && up !== content; up = up.parentElement)
      if (up.scrollWidth > up.clientWidth + 1 && getComputedStyle(up).overflowX !== "visible") {
        wide.push(`${what}: ${up.scrollWidth - up.clientWidth} px hidden in a scroll box`);
        break;
      }
  }
  const rect = content.getBoundingClientRect();
  return JSON.stringify({
    title: document.title,
    formulas: formulas.length,
    untypeset: formulas.filter(f => !f.querySelector(".katex"))
                       .map(f => f.textContent.slice(0, 60)),
    katexErrors: [...document.querySelectorAll(".katex-error")].map(e => e.title || e.textContent),
    rawTex: raw,
    katexFonts: faces.filter(f => f.status === "loaded")
                     .map(f => `${f.family} ${f.style} ${f.weight}`),
    katexFontsFailed: faces.filter(f => f.status === "error").map(f => f.family),
    wide: wide,
    pageWidth: [document.documentElement.scrollWidth, innerWidth],
    text: content.innerText.trim().length,
    content: [rect.left + scrollX, rect.top + scrollY, rect.width, rect.height],
  });
})()"""

# At a phone's width: wide tables and formulas scroll inside the column, the page does not.
_NARROW = r"""(() => {
  const content = document.querySelector(".md-content");
  const column = content.getBoundingClientRect();
  const problems = [];
  if (document.documentElement.scrollWidth > innerWidth + 1)
    problems.push(`the page is ${document.documentElement.scrollWidth} px wide ` +
                  `in a ${innerWidth} px window`);
  for (const el of content.querySelectorAll("table, .katex-display")) {
    let box = el.parentElement;
    while (box !== content && getComputedStyle(box).overflowX === "visible")
      box = box.parentElement;
    const b = box.getBoundingClientRect(), w = el.getBoundingClientRect().width;
    const what = el.tagName === "TABLE" ? "a table" : "a formula";
    if (b.left < column.left - 1 || b.right > column.right + 1)
      problems.push(`${what}'s scroll box sticks out of the column`);
    if (w > b.width + 1 && !["auto", "scroll"].includes(getComputedStyle(box).overflowX))
      problems.push(`${what} is cut off: ${Math.round(w)} px in ${Math.round(b.width)} px, ` +
                    "no scrolling");
  }
  return JSON.stringify(problems);
})()"""

# The screenshot, drawn on a canvas in the browser: how much of the content area is not
# background (ink) and how many colors it has.
_INK = r"""(async (src, crop) => {
  const img = new Image();
  img.src = src;
  await img.decode();
  const [x, y, w, h] = crop.map(Math.round);
  const W = 256, H = Math.max(1, Math.round(h * W / w));
  const canvas = document.createElement("canvas");
  canvas.width = W; canvas.height = H;
  const g = canvas.getContext("2d");
  g.drawImage(img, x, y, w, h, 0, 0, W, H);
  const d = g.getImageData(0, 0, W, H).data;
  const counts = new Map();
  for (let i = 0; i < d.length; i += 4) {
    const key = (d[i] >> 4) << 8 | (d[i + 1] >> 4) << 4 | (d[i + 2] >> 4);
    counts.set(key, (counts.get(key) || 0) + 1);
  }
  return JSON.stringify({colors: counts.size, ink: 1 - Math.max(...counts.values()) / (W * H),
                         size: [img.width, img.height]});
})"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served_site(tmp_path_factory):
    site, done = build_site(tmp_path_factory)
    assert done.returncode == 0, done.stdout + done.stderr
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield site, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_pages_render_in_chromium(served_site, tmp_path):
    site, base = served_site
    shots = Path(os.environ.get("NBBN_DOCS_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    pages = [name.removesuffix("index.html") for name in site_pages(site)
             if name.endswith("index.html")]
    assert len(pages) >= 10 and "" in pages
    with open(tmp_path / "chromium.log", "wb") as log:
        browser = Browser(CHROMIUM, tmp_path / "profile", log)
        problems = {}
        math_pages = 0
        try:
            for page in pages:
                url = base + page
                browser.requests.clear()
                browser.errors.clear()
                browser.open(url, DESKTOP)
                seen = browser.evaluate(_RENDERED)
                fonts = browser.platform_fonts()
                png = browser.screenshot()
                name = page.strip("/").replace("/", "-") or "index"
                (shots / f"{name}.png").write_bytes(png)
                data_url = "data:image/png;base64," + base64.b64encode(png).decode()
                ink = browser.evaluate(
                    f"{_INK}({json.dumps(data_url)}, {json.dumps(seen['content'])})")
                browser.resize(NARROW)
                narrow = browser.evaluate(_NARROW)

                found = []
                found += [f"formula not typeset: {t!r}" for t in seen["untypeset"]]
                found += [f"KaTeX error: {t}" for t in seen["katexErrors"]]
                found += [f"raw TeX in the text: {t!r}" for t in seen["rawTex"]]
                found += [f"KaTeX font not loaded: {f}" for f in seen["katexFontsFailed"]]
                if seen["formulas"]:
                    math_pages += 1
                    if not seen["katexFonts"]:
                        found.append("formulas, but no KaTeX font loaded")
                found += [f"text drawn in {family!r}, a font the site does not ship: {text!r}"
                          for (family, shipped), text in fonts.items()
                          if not (shipped and family.startswith(SHIPPED_FONTS))]
                found += [f"too wide at {DESKTOP[0]} px: {w}" for w in seen["wide"]]
                if seen["pageWidth"][0] > seen["pageWidth"][1] + 1:
                    found.append(f"the page scrolls sideways at {DESKTOP[0]} px: "
                                 f"{seen['pageWidth']}")
                found += [f"at {NARROW[0]} px: {p}" for p in narrow]
                found += [f"fetched from outside the site: {u}" for u in browser.requests
                          if not u.startswith((base, "data:", "blob:", "about:"))]
                found += browser.errors
                if seen["text"] < 200:
                    found.append(f"almost no text: {seen['text']} characters")
                if ink["ink"] < 0.01 or ink["colors"] < 8:
                    found.append(f"the screenshot looks blank: {ink}")
                if found:
                    problems[url] = found
        finally:
            browser.close()
    assert problems == {}, json.dumps(problems, indent=1, ensure_ascii=False)
    assert math_pages >= 3      # the home page (the math), Batch Renormalization, folding, ...
