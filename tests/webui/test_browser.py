"""A real browser (Debian's chromium through Playwright) against the running app: type, read the
streamed answer, switch backend, answer again; the page is saved as test-output/chat.png."""
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the Python package)")
CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"no browser at {CHROMIUM}: apt-get install chromium", allow_module_level=True)

from .conftest import ROOT, ort_missing  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(server)
        yield page
        (ROOT / "test-output").mkdir(exist_ok=True)
        page.screenshot(path=str(ROOT / "test-output" / "last-page.png"), full_page=True)  # for a failure's post-mortem
        browser.close()


def ask(page, message: str, n: int) -> tuple[str, str]:
    """Send the n-th message; wait for the first streamed text, then for the answer's status line.
    Returns (the answer's first message text, its status line)."""
    bots = page.locator('[data-testid="bot"]')
    before = bots.count()
    box = page.locator('textarea[data-testid="textbox"]').first  # the chat's; "Type a message..." only while empty
    box.fill(message)
    box.press("Enter")
    bots.nth(before).wait_for()  # the reply appears (and grows) in the page
    status = page.locator('[data-testid="bot"]', has_text="tok/s").nth(n - 1)
    status.wait_for()
    return bots.nth(before).inner_text(), status.inner_text()


def test_chat_switch_backend_and_screenshot(page):
    page.get_by_text("Loaded: ").wait_for()
    first_backend = "PyTorch eager" if ort_missing() else "ONNX Runtime"
    assert first_backend in page.get_by_text("Loaded: ").inner_text()

    if not page.get_by_label("Backend").is_visible():
        page.get_by_text("Settings: system prompt").click()  # open the accordion
    page.get_by_label("Seed (-1 = random)").fill("1")  # the page samples: a fixed seed, a fixed reply

    reply, status = ask(page, "hello there", 1)
    assert status.startswith("torch on cpu" if ort_missing() else "onnx on CPUExecutionProvider")
    # a reply, not only the status line. The model is random, so the reply may be a single token:
    # its length is not checked.
    assert reply != status and reply.strip()

    page.get_by_label("Backend").click()
    page.get_by_role("option", name="PyTorch eager").click()
    page.get_by_text("on PyTorch eager (cpu)").wait_for()  # the line at the top follows the switch

    reply, status = ask(page, "what is the capital of France?", 2)
    assert status.startswith("torch on cpu") and reply != status
    assert page.get_by_text("hello there").count() == 1  # the first turn is still on the page

    # a reply keeps the model's spaces: code outside a fenced block keeps its indentation
    paragraph = page.locator("#chat .message-content p").first
    assert paragraph.evaluate("e => getComputedStyle(e).whiteSpace") == "pre-wrap"

    out = ROOT / "test-output"
    out.mkdir(exist_ok=True)
    page.screenshot(path=str(out / "chat.png"), full_page=True)
    assert (out / "chat.png").stat().st_size > 10_000


def test_text_tab_parity_verdict_and_model_card(page):
    """The Text tab continues a text as it is; the Parity tab's verdict says where the backends part
    (or that they agree) and what to expect of the served variant; the card says where the weights
    came from."""
    page.get_by_role("tab", name="Text").click()
    box = page.get_by_label("Text", exact=True)
    box.fill("Once upon a time")
    page.get_by_role("button", name="Continue").click()
    page.get_by_text("tok/s").last.wait_for()
    assert box.input_value().startswith("Once upon a time")

    page.get_by_role("tab", name="Parity: PyTorch vs ONNX Runtime").click()
    page.get_by_role("button", name="Compare").click()
    verdict = page.locator("strong", has_text="Greedy tokens")  # the verdict's first words
    verdict.wait_for()
    assert verdict.inner_text() == "Greedy tokens agree" or verdict.inner_text().startswith("Greedy tokens part at token")
    assert page.locator("p", has_text="ONNX Runtime runs").count() == 1  # the expectation for the served variant

    page.get_by_role("tab", name="Model card").click()
    card = page.get_by_text("weights from")
    card.wait_for()
    assert "?" not in card.inner_text()
