"""The chat page of `python -m pyturbo.server --demo` in a real headless browser (Debian's chromium and its
chromedriver; .ci/run installs them): load it, send a message, watch the answer stream in, keep a screenshot."""
from __future__ import annotations

import shutil

import pytest

from serverproc import ServerProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("no chromium and chromedriver on PATH: apt-get install chromium chromium-driver (.ci/run does)",
                allow_module_level=True)
pytest.importorskip("fastapi", reason="the server's dependencies are missing: pip install '.[test]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install '.[test]'")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# every change of the answer's text, as its length: an answer that streams grows in several steps
RECORD_GROWTH = """
window.__lengths = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll('.msg.assistant span');
  if (answers.length) window.__lengths.push(answers[answers.length - 1].textContent.length);
}).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
"""

# the page's requests with a logit bias against ending (and against the few tokens without text): when a random-weight
# model draws EOS is a matter of the CPU's numerics, and an answer that ends at once does not show streaming
NEVER_END = """
const bias = arguments[0], realFetch = window.fetch;
window.fetch = (url, opts) => {
  if (url === "/v1/chat/completions" && opts && opts.body) {
    opts = {...opts, body: JSON.stringify({...JSON.parse(opts.body), logit_bias: bias})};
  }
  return realFetch(url, opts);
};
"""


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(arg)
    # the system's driver: Selenium Manager never looks for (or downloads) one when it is given
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def test_page_streams_an_answer_with_its_prefill_figures(tmp_path, vocab_model):
    import pyturbo
    with pyturbo.Model(vocab_model, devices=[]) as model:   # the demo's vocabulary ("tiny")
        bias = {str(t): -100 for t in range(model.n_vocab) if model.is_eog(t) or not model.token_bytes(t)}
    shot = tmp_path / "chat.png"
    with ServerProcess(["--demo"], tmp_path / "server.log", env={"PYTURBO_CACHE": str(tmp_path / "cache")}) as srv:
        drv = browser()
        try:
            drv.set_page_load_timeout(30)
            drv.get(srv.url + "/")
            WebDriverWait(drv, 20).until(lambda d: "pipeline" in d.find_element(By.ID, "status").text)
            drv.execute_script(RECORD_GROWTH)
            drv.execute_script(NEVER_END, bias)
            tokens = drv.find_element(By.ID, "max_tokens")
            tokens.clear()
            tokens.send_keys("150")
            drv.find_element(By.ID, "prompt").send_keys("hello, what is a pipeline?")
            drv.find_element(By.ID, "send").click()
            WebDriverWait(drv, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats"))
            lengths = drv.execute_script("return window.__lengths")
            answer = drv.find_element(By.CSS_SELECTOR, ".msg.assistant span").text
            stats = drv.find_element(By.CSS_SELECTOR, ".msg.assistant .stats").text
            errors = [e.text for e in drv.find_elements(By.CSS_SELECTOR, ".msg.error")]
            drv.save_screenshot(str(shot))
        finally:
            drv.quit()
    print(f"screenshot: {shot}")
    assert not errors
    assert answer.strip() and len(set(x for x in lengths if x)) >= 3, f"the answer did not stream: {lengths}"
    assert "tok/s" in stats and "first token" in stats and "path " in stats, stats
    assert "150 tok at" in stats, stats   # all of max_tokens: the bias reached the server
    assert shot.stat().st_size > 5000
