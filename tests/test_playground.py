"""The playground page at GET /, used by hand in a real browser: Debian's headless Chromium driven by Selenium
against `finetune serve`, for a classification model behind an API key and an NER model; and /docs offline.

Screenshots go to $FINETUNE_TEST_ARTIFACTS when set (else pytest's temporary folder); their paths are printed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import tiny_recipe, train_outside_test
from tests.test_serving import Server

pytestmark = pytest.mark.e2e
KEY = "playground-s3cret"
# Without the background-networking flags Chromium keeps calling home, which floods a closed network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1100,1000"]
# A leading emoji: Python's offsets count it as one character, JavaScript strings as two units, so the drawn
# spans are right only if the page converts. The markup must come out as text, not as an element.
NER_TEXT = "🙂 Maria Garcia and Kenji Watanabe signed the deal for Siemens in New York . <img src=x>"


def _chromium() -> tuple[str, str]:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("no chromium and chromedriver on PATH: apt-get install chromium chromium-driver "
                    "(scripts/test.sh does when run as root)")
    return browser, driver


@contextlib.contextmanager
def headless_chromium(logs: tuple[str, ...] = ("performance",)):
    """Headless Chromium with a fresh profile, removed afterwards; `logs` are the logs it keeps (performance: every
    request a page makes; browser: its console, CSP refusals included)."""
    binary, driver_path = _chromium()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra: pip install -e '.[dev]'")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {log: "ALL" for log in logs})
    # An explicit chromedriver path: Selenium Manager, which would try to download one, never runs.
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium whose network log records every request a page makes."""
    with headless_chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = os.environ.get("FINETUNE_TEST_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def models(tiny_checkpoints, tmp_path_factory):
    """A tiny classifier and a tiny NER model; the NER one is trained long enough to find the sample's names."""
    _chromium()  # skip before training when the browser is missing
    root = tmp_path_factory.mktemp("playground")
    tracking = {"log_model": False, "system_metrics": False, "experiment": "playground"}
    classifier = train_outside_test(root, tiny_recipe(tiny_checkpoints["bert"], "classification",
                                                      output_dir=str(root / "cls"), tracking=tracking))
    ner = train_outside_test(root, tiny_recipe(
        tiny_checkpoints["bert"], "token_classification", output_dir=str(root / "ner"), tracking=tracking,
        data={"validation_size": 0.1},
        training={"max_steps": 30, "learning_rate": 1e-2, "batch_size": 8, "logging_steps": 10}))
    return {"classification": classifier.best_dir, "token_classification": ner.best_dir}


def _screenshot(driver, artifacts: Path, name: str, capsys) -> Path:
    """The whole page, beyond the window's height, saved as PNG; its path is printed."""
    import base64

    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 4000), "scale": 1}})
    path = artifacts / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    with capsys.disabled():
        print(f"\nscreenshot: {path}")
    return path


def _wait(driver, condition, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def _by_id(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def _all(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def _submit_text(driver, text: str, box: str = "text") -> str:
    """Type a text in the form, press Predict, and wait for the drawn answer (or error); returns the state."""
    # The page builds its form once GET /v1/model has answered: on a busy machine that is after the load event.
    _wait(driver, lambda d: _all(d, f"#{box}"))
    field = _by_id(driver, box)
    field.clear()
    field.send_keys(text)
    _by_id(driver, "submit").click()
    _wait(driver, lambda d: _by_id(d, "result").get_attribute("data-state") in ("done", "error"))
    return _by_id(driver, "result").get_attribute("data-state")


def _requested_urls(driver) -> list[str]:
    """Every URL the browser requested since the log was last read."""
    import json

    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _off_server(urls: list[str], base: str) -> list[str]:
    origin = urlsplit(base)[:2]
    return [u for u in urls if not u.startswith("data:") and urlsplit(u)[:2] != origin]


def test_classification_behind_an_api_key(browser, models, artifacts, capsys):
    server = Server("--model", str(models["classification"]), env={"FINETUNE_API_KEY": KEY})
    try:
        page = httpx.get(f"{server.url}/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert httpx.get(f"{server.url}/v1/model").status_code == 401
        headers = {"X-API-Key": KEY}
        info = httpx.get(f"{server.url}/v1/model", headers=headers).json()
        _requested_urls(browser)  # forget earlier pages' requests

        browser.get(f"{server.url}/")
        _wait(browser, lambda d: _by_id(d, "key-form").is_displayed())
        assert "needs an API key" in _by_id(browser, "key-message").text
        assert not _by_id(browser, "predict-form").is_displayed()
        _by_id(browser, "api-key").send_keys("not-the-key")
        _by_id(browser, "key-form").submit()
        _wait(browser, lambda d: "refused" in _by_id(d, "key-message").text)
        _by_id(browser, "api-key").send_keys(KEY)
        _by_id(browser, "key-form").submit()
        _wait(browser, lambda d: _by_id(d, "predict-form").is_displayed())
        assert not _by_id(browser, "key-form").is_displayed()
        assert browser.execute_script("return sessionStorage.getItem('finetune-api-key')") == KEY

        assert _by_id(browser, "model-name").text == info["name"]
        assert _by_id(browser, "model-task").get_attribute("data-task") == "classification"
        shown = {row.get_attribute("data-metric") for row in _all(browser, "#metrics tr")}
        assert shown == set(info["metrics"]) and shown

        text = "a gripping, beautiful film"
        assert _submit_text(browser, text) == "done"
        (want,) = httpx.post(f"{server.url}/v1/predict", json={"inputs": [text]}, headers=headers).json()["predictions"]
        bars = _all(browser, "#result .bar")
        drawn = {bar.get_attribute("data-label"): float(bar.get_attribute("data-score")) for bar in bars}
        assert drawn == want["scores"]  # the exact numbers /v1/predict returned, one bar per label
        for bar in bars:
            percent = float(bar.find_element("css selector", ".bar-score").text.rstrip("%"))
            assert abs(percent - 100 * drawn[bar.get_attribute("data-label")]) <= 0.051
        (chosen,) = _all(browser, "#result .bar.chosen")
        assert chosen.get_attribute("data-label") == want["label"] == _by_id(browser, "answer-label").text
        _screenshot(browser, artifacts, "playground-classification", capsys)

        # A 4xx is shown with the server's reason, and the page keeps working.
        assert _submit_text(browser, "   ") == "error"
        error = _by_id(browser, "error")
        assert error.is_displayed() and "422" in error.text and "inputs[0]: no visible characters" in error.text
        assert _submit_text(browser, text) == "done" and not _by_id(browser, "error").is_displayed()

        assert _off_server(_requested_urls(browser), server.url) == []
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ner_server(models):
    server = Server("--model", str(models["token_classification"]))
    yield server
    server.stop()


def test_ner_entities_are_highlighted_in_the_text(browser, ner_server, artifacts, capsys):
    _requested_urls(browser)
    browser.get(f"{ner_server.url}/")
    _wait(browser, lambda d: _by_id(d, "predict-form").is_displayed())
    assert not _by_id(browser, "key-form").is_displayed()
    assert _by_id(browser, "model-task").get_attribute("data-task") == "token_classification"

    assert _submit_text(browser, NER_TEXT) == "done"
    (want,) = httpx.post(f"{ner_server.url}/v1/predict", json={"inputs": [NER_TEXT]}).json()["predictions"]
    assert want["entities"], "the tiny NER model found no entity: the check below would prove nothing"
    marks = _all(browser, "#result mark.entity")
    drawn = [(m.get_attribute("data-type"), m.find_element("css selector", ".span-text").get_attribute("textContent"),
              int(m.get_attribute("data-start")), int(m.get_attribute("data-end"))) for m in marks]
    assert drawn == [(e["type"], e["text"], e["start"], e["end"]) for e in want["entities"]]
    assert [m.find_element("css selector", ".entity-type").text for m in marks] == [e["type"] for e in want["entities"]]
    # The whole text is drawn once, as text: the markup in it made no element.
    assert _drawn_text(browser) == NER_TEXT
    assert _all(browser, "#result img") == []
    _screenshot(browser, artifacts, "playground-ner", capsys)
    assert _off_server(_requested_urls(browser), ner_server.url) == []


def test_docs_load_swagger_ui_from_the_server(browser, ner_server, artifacts, capsys):
    _requested_urls(browser)
    browser.get(f"{ner_server.url}/docs")
    _wait(browser, lambda d: any("/v1/predict" in e.text for e in _all(d, ".opblock-summary-path")))
    urls = _requested_urls(browser)
    assert any(u.endswith("swagger-ui-bundle.js") for u in urls) and any(u.endswith("/openapi.json") for u in urls)
    assert _off_server(urls, ner_server.url) == []
    _screenshot(browser, artifacts, "docs", capsys)


def _drawn_text(driver) -> str:
    """The highlighted paragraph's text, marks' labels left out."""
    return driver.execute_script(
        "const p = document.querySelector('#result .highlighted');"
        "return Array.from(p.childNodes).map(n => n.nodeType === 3 ? n.textContent"
        " : n.querySelector('.span-text').textContent).join('')")


# The other tasks' forms and drawings, against answers of the documented shapes (PredictResponse, README):
# the page is the served one, and only its two API calls are answered by a stand-in fetch, recording what
# the page sent. (A server per task would cost seconds each; the classification and NER tests above use real ones.)
_STUB_FETCH = """
(() => {
  const stub = %s;
  window.sentBodies = [];
  const realFetch = window.fetch.bind(window);
  const json = (body, status, headers) =>
    new Response(JSON.stringify(body), {status, headers: {"Content-Type": "application/json", ...headers}});
  window.fetch = async (path, init = {}) => {
    const where = new URL(path, location.href).pathname;
    if (where === "/v1/model") return json(stub.model, 200, {});
    if (where === "/v1/predict") {
      window.sentBodies.push(JSON.parse(init.body));
      return json(stub.reply, stub.status, stub.headers);
    }
    return realFetch(path, init);
  };
})();
"""


def _open_stubbed(driver, base: str, model: dict, reply: dict, status: int = 200, headers: dict | None = None) -> None:
    import json

    info = {"name": "stub-model", "version": "7", "run_id": None, "source": "stub", "runtime": "pytorch fp32",
            "text_pair": False, "label_names": None, "max_length": 64, "threshold": 0.5, "metrics": {"accuracy": 0.75},
            **model}
    stub = {"model": info, "reply": reply, "status": status, "headers": headers or {}}
    added = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _STUB_FETCH % json.dumps(stub)})
    try:
        driver.get(f"{base}/")
        _wait(driver, lambda d: _by_id(d, "predict-form").is_displayed())
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": added["identifier"]})
    assert _by_id(driver, "model-task").get_attribute("data-task") == info["task"]


def _fill(driver, **values: str) -> None:
    for name, value in values.items():
        box = _by_id(driver, name.replace("_", "-"))
        box.clear()
        box.send_keys(value)


def _press_predict(driver) -> tuple[str, list]:
    _by_id(driver, "submit").click()
    _wait(driver, lambda d: _by_id(d, "result").get_attribute("data-state") in ("done", "error"))
    return _by_id(driver, "result").get_attribute("data-state"), driver.execute_script("return window.sentBodies")


def _reply(answer: dict) -> dict:
    return {"model": "stub-model", "version": "7", "predictions": [{"truncated": False, **answer}]}


def test_qa_and_multiple_choice_forms_and_answers(browser, ner_server, artifacts, capsys):
    context = "La tour Eiffel 🗼 se trouve à Paris, en France."
    start = context.index("Paris")  # a code-point offset, as the server's are
    _open_stubbed(browser, ner_server.url, {"task": "question_answering"},
                  _reply({"answer": "Paris", "start": start, "end": start + 5, "score": 0.81}))
    _fill(browser, question="Où est la tour Eiffel ?", context=context)
    assert _press_predict(browser) == ("done", [{"inputs": [{"question": "Où est la tour Eiffel ?", "context": context}]}])
    (mark,) = _all(browser, "#result mark.answer")
    assert mark.find_element("css selector", ".span-text").text == "Paris" == _by_id(browser, "answer-text").text
    assert _drawn_text(browser) == context
    _screenshot(browser, artifacts, "playground-qa", capsys)

    choices = ["It got warm.", "It started to snow.", "The fire went out."]
    _open_stubbed(browser, ner_server.url, {"task": "multiple_choice"},
                  _reply({"choice": 2, "text": choices[2], "score": 0.7, "scores": [0.1, 0.2, 0.7]}))
    assert len(_all(browser, ".choice-input")) == 2
    assert all(not b.is_enabled() for b in _all(browser, ".remove-choice"))  # the API needs two at least
    _by_id(browser, "add-choice").click()
    _by_id(browser, "add-choice").click()
    _all(browser, ".remove-choice")[3].click()
    boxes = _all(browser, ".choice-input")
    assert len(boxes) == 3 and all(b.is_enabled() for b in _all(browser, ".remove-choice"))
    for box, choice in zip(boxes, choices):
        box.send_keys(choice)
    _fill(browser, context="The man lit the fire.", start="Then")
    state, sent = _press_predict(browser)
    assert state == "done" and sent == [{"inputs": [{"context": "The man lit the fire.", "choices": choices, "start": "Then"}]}]
    (chosen,) = _all(browser, "#result .bar.chosen")
    assert chosen.get_attribute("data-choice") == "2" and "chosen" in chosen.text and choices[2] in chosen.text
    assert [float(b.get_attribute("data-score")) for b in _all(browser, "#result .bar")] == [0.1, 0.2, 0.7]
    _screenshot(browser, artifacts, "playground-choice", capsys)


def test_multi_label_regression_and_pair_forms_and_answers(browser, ner_server, artifacts, capsys):
    labels = ["joy", "anger", "fear"]
    _open_stubbed(browser, ner_server.url, {"task": "multi_label", "label_names": labels, "threshold": 0.5},
                  _reply({"labels": ["joy", "fear"], "label_scores": [0.9, 0.35],
                          "scores": {"joy": 0.9, "anger": 0.1, "fear": 0.35}}))
    assert _by_id(browser, "threshold").get_attribute("value") == "0.5"  # the model's own
    _fill(browser, text="thanks, I love it", threshold="0.3")
    assert _press_predict(browser) == ("done", [{"inputs": ["thanks, I love it"], "options": {"threshold": 0.3}}])
    assert {b.get_attribute("data-label") for b in _all(browser, "#result .bar.chosen")} == {"joy", "fear"}
    assert [b.get_attribute("data-label") for b in _all(browser, "#result .bar")] == ["joy", "fear", "anger"]

    _open_stubbed(browser, ner_server.url, {"task": "regression"}, _reply({"value": 3.14159, "truncated": True}))
    _fill(browser, text="a fine film")
    assert _press_predict(browser) == ("done", [{"inputs": ["a fine film"]}])
    value = _by_id(browser, "answer-value")
    assert value.get_attribute("data-value") == "3.14159" and value.text == "3.142"
    assert "longer than the 64 tokens" in _by_id(browser, "result").text

    _open_stubbed(browser, ner_server.url, {"task": "classification", "text_pair": True, "label_names": ["0", "1"]},
                  {"detail": "busy: 512 inputs waiting; retry shortly"}, status=503, headers={"Retry-After": "1"})
    _fill(browser, text="The cat sat.", text_pair="A cat was sitting.")
    state, sent = _press_predict(browser)
    assert state == "error" and sent == [{"inputs": [["The cat sat.", "A cat was sitting."]]}]
    error = _by_id(browser, "error").text
    assert "503" in error and "busy: 512 inputs waiting" in error and "retry after 1 s" in error


# --- issue 34: several models, a picker, copy as curl, metrics that fit, served names ----------------------------------

LONG_METRIC = "eval/per_type_precision_of_a_very_long_entity_type_name_that_takes_the_whole_card"


def _fits(driver, css: str) -> list[str]:
    """Elements matching `css` whose cells stick out of the row (their card), by bounding boxes."""
    return driver.execute_script("""
        const out = [];
        for (const row of document.querySelectorAll(arguments[0])) {
          const box = row.getBoundingClientRect();
          for (const cell of row.children) {
            const c = cell.getBoundingClientRect();
            if (c.left < box.left - 0.5 || c.right > box.right + 0.5) out.push(row.dataset.metric + ": " + cell.tagName);
          }
        }
        return out;""", css)


def test_several_models_a_picker_copy_as_curl_and_served_names(browser, models, artifacts, capsys):
    import subprocess

    server = Server("--model", f"sentiment={models['classification']}", "--model",
                    f"entities={models['token_classification']}", env={"FINETUNE_API_KEY": KEY})
    headers = {"X-API-Key": KEY}
    try:
        # Answers carry the served name (NAME of --model NAME=SOURCE), not the recipe's.
        for path, name in (("/v1/predict", "sentiment"), ("/v1/models/sentiment/predict", "sentiment"),
                           ("/v1/models/entities/predict", "entities")):
            reply = httpx.post(f"{server.url}{path}", json={"inputs": ["Maria lives in Paris ."]}, headers=headers)
            assert reply.status_code == 200 and reply.json()["model"] == name, (path, reply.text)

        browser.set_window_size(1200, 1000)
        browser.get(f"{server.url}/")
        _wait(browser, lambda d: _by_id(d, "key-form").is_displayed())
        _by_id(browser, "api-key").send_keys(KEY)
        _by_id(browser, "key-form").submit()
        _wait(browser, lambda d: _by_id(d, "predict-form").is_displayed())

        assert _by_id(browser, "picker").is_displayed()
        options = [o.get_attribute("value") for o in _all(browser, "#model-picker option")]
        assert options == ["sentiment", "entities"]
        assert _by_id(browser, "model-name").text == "sentiment"
        assert _by_id(browser, "model-task").get_attribute("data-task") == "classification"
        assert _submit_text(browser, "a fine film") == "done"
        assert "Answered by sentiment" in _by_id(browser, "result").text

        from selenium.webdriver.support.ui import Select

        Select(_by_id(browser, "model-picker")).select_by_value("entities")
        _wait(browser, lambda d: _by_id(d, "model-task").get_attribute("data-task") == "token_classification")
        assert _by_id(browser, "model-name").text == "entities" and _by_id(browser, "result").text == ""
        _requested_urls(browser)
        assert _submit_text(browser, "Maria Garcia lives in New York .") == "done"
        assert "Answered by entities" in _by_id(browser, "result").text
        assert any(u.endswith("/v1/models/entities/predict") for u in _requested_urls(browser))

        # Copy as curl: the current request, the key by name only; run, it answers as the page did.
        snippet = _by_id(browser, "curl-snippet").text
        assert f"{server.url}/v1/models/entities/predict" in snippet and '"Maria Garcia lives in New York ."' in snippet
        assert "$FINETUNE_API_KEY" in snippet and KEY not in snippet
        _by_id(browser, "copy-curl").click()
        _wait(browser, lambda d: _by_id(d, "curl-status").text != "")
        if shutil.which("curl"):
            done = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, timeout=60,
                                  env={**os.environ, "FINETUNE_API_KEY": KEY})
            assert done.returncode == 0, done.stderr
            assert __import__("json").loads(done.stdout)["model"] == "entities"

        # At 1200 px every metric's name and value stay inside their card, a long name included.
        browser.execute_script("""
            const row = document.createElement('tr'); row.dataset.metric = arguments[0];
            const th = document.createElement('th'); th.textContent = arguments[0];
            const td = document.createElement('td'); td.textContent = '0.123456789';
            row.append(th, td); document.querySelector('#metrics tbody').append(row);
            document.getElementById('metrics').hidden = false;""", LONG_METRIC)
        assert len(_all(browser, "#metrics tr")) > 1
        assert _fits(browser, "#metrics tr") == []
        _screenshot(browser, artifacts, "playground-several-models", capsys)
    finally:
        browser.set_window_size(1100, 1000)
        server.stop()


def test_an_unnamed_folder_is_served_under_its_runs_folder_name(ner_server, models):
    info = httpx.get(f"{ner_server.url}/v1/model").json()
    assert info["name"] == models["token_classification"].parent.name == "ner"
    reply = httpx.post(f"{ner_server.url}/v1/predict", json={"inputs": ["Maria lives in Paris ."]})
    assert reply.json()["model"] == "ner"
