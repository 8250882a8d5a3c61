"""The chat page in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium): type a
message, watch the streamed answer arrive, keep a screenshot."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from serving.servers import ServerProcess

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--window-size=1100,900",
)

pytestmark = pytest.mark.browser


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    for binary in (CHROMEDRIVER, "/usr/bin/chromium"):
        if not Path(binary).exists():
            pytest.fail(f"{binary} is missing: run `bash hack/setup.sh --test` (Debian chromium, chromium-driver)")
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(
        service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")), options=options
    )
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def assistant_messages(driver: webdriver.Chrome) -> list:
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def test_chat_page_streams_an_answer(browser: webdriver.Chrome, chat_server: ServerProcess, tmp_path: Path) -> None:
    wait = WebDriverWait(browser, 60)
    browser.get(chat_server.url + "/")
    assert browser.title == "kuberlhf chat"
    # the shared server wants an API key: the page has a field for it
    browser.find_element(By.ID, "settings").click()
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(chat_server.api_key or "")
    key.send_keys(Keys.TAB)
    wait.until(lambda d: d.find_element(By.ID, "model").text == "model: tiny")
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys("200")

    # watch the answer's text grow: a streamed answer is seen at more than one length before it is done
    browser.execute_script(
        """
        window.__lengths = [];
        new MutationObserver(() => {
          const el = document.querySelector('.msg.assistant .text');
          if (el) window.__lengths.push(el.textContent.length);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
        """
    )
    box = browser.find_element(By.ID, "input")
    box.send_keys("Hello from the browser")
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: assistant_messages(d) and assistant_messages(d)[-1].get_attribute("data-state") == "done")
    user = browser.find_elements(By.CSS_SELECTOR, ".msg.user .text")
    assert [u.text for u in user] == ["Hello from the browser"]
    answer = assistant_messages(browser)[-1].find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")
    assert answer
    lengths = [n for n in browser.execute_script("return window.__lengths") if n > 0]
    assert len(set(lengths)) > 1, f"answer did not stream: lengths seen {lengths}"
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    browser.save_screenshot(str(tmp_path / "chat-page.png"))
    assert (tmp_path / "chat-page.png").stat().st_size > 1000

    # a second turn carries the history; Clear empties the conversation
    box.send_keys("And again")
    box.send_keys(Keys.ENTER)
    wait.until(
        lambda d: len(assistant_messages(d)) == 2 and assistant_messages(d)[-1].get_attribute("data-state") == "done"
    )
    browser.find_element(By.ID, "clear").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
