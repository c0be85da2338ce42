"""/docs, /redoc and the playground in a real browser (Debian's headless Chromium, as tests/test_playground.py) for a
model whose name and labels are markup (issue 33, class 2): nothing of them runs, and the pages still work under
their Content-Security-Policy (no inline script: a page that needed one would be blank)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.conftest import tiny_recipe, train_outside_test
from tests.test_playground import _chromium, headless_chromium

pytestmark = pytest.mark.e2e
HOSTILE_NAME = "<img src=x onerror=\"window.pwned='name'\"><script>window.pwned='script'</script>"
HOSTILE_LABELS = ["<svg onload=\"window.pwned='label'\">", "\"><img src=y onerror=\"window.pwned='label2'\">"]


@pytest.fixture(scope="module")
def browser():
    with headless_chromium(logs=("browser", "performance")) as driver:
        yield driver


@pytest.fixture(scope="module")
def hostile_server(tiny_checkpoints, tmp_path_factory):
    """The app `finetune serve` runs, in a uvicorn thread, for a tiny model renamed and relabelled with markup."""
    _chromium()  # skip before training when the browser is missing
    import uvicorn

    from finetune.models.predictor import Predictor
    from serving.app import Settings, create_app
    from serving.loading import LoadedModel

    root = tmp_path_factory.mktemp("hostile")
    best = train_outside_test(root, tiny_recipe(tiny_checkpoints["bert"], output_dir=str(root / "run"), tracking={
        "log_model": False, "system_metrics": False, "experiment": "hostile"})).best_dir
    predictor = Predictor.from_dir(best)
    predictor.info.label_names = HOSTILE_LABELS
    app = create_app(LoadedModel(predictor, HOSTILE_NAME, "1", None, str(best)), Settings())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.1)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def _wait_for(driver, css: str, timeout: float = 30) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = driver.execute_script(f"return document.querySelectorAll({json.dumps(css)}).length")
        if found:
            return found
        time.sleep(0.2)
    return 0


def _console(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser")]


@pytest.mark.parametrize("page,rendered", [
    ("/docs", ".opblock-summary-path"),  # Swagger UI drew the operations
    ("/redoc", "[data-section-id]"),  # ReDoc drew its sections
    ("/", "#predict-form:not([hidden])"),  # the playground read /v1/model and drew its form
])
def test_pages_work_under_their_policy_and_run_no_markup_from_names(browser, hostile_server, page, rendered):
    _console(browser)  # forget earlier pages' messages
    browser.get(f"{hostile_server}{page}")
    assert _wait_for(browser, rendered), (page, _console(browser))
    if page == "/":
        # The name and labels are shown, as text; the form sends a text and draws one bar per (hostile) label.
        assert browser.execute_script("return document.getElementById('model-name').textContent") == HOSTILE_NAME
        browser.find_element("id", "text").send_keys("a fine film")
        browser.find_element("id", "submit").click()
        assert _wait_for(browser, "#result[data-state=done] .bar"), _console(browser)
        labels = browser.execute_script(
            "return Array.from(document.querySelectorAll('#result .bar')).map(b => b.dataset.label)")
        assert sorted(labels) == sorted(HOSTILE_LABELS)
    time.sleep(0.5)  # any handler the markup carried has had its chance
    assert browser.execute_script("return window.pwned === undefined"), browser.execute_script("return window.pwned")
    assert browser.execute_script("return document.querySelectorAll('img[src=x], img[src=y], svg[onload]').length") == 0
    messages = _console(browser)
    # Nothing the pages need is refused: the only refusals allowed are of images from elsewhere (ReDoc's logo).
    refused = [m for m in messages if "Content Security Policy" in m and "img-src" not in m]
    assert refused == [], refused
