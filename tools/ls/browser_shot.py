"""Log in to Label Studio and screenshot a task's labeling page (Selenium + system Chromium).

Runs in ``.venv-ls`` (it has selenium; nothing is downloaded: ``/usr/bin/chromium`` and
``/usr/bin/chromedriver`` come from Debian), so it imports nothing of this project; the login comes
from the environment (``LS_USER``, ``LS_PASSWORD``).  Called by ``tools/ls/screenshot_labeling.py``::

    LS_USER=... LS_PASSWORD=... .venv-ls/bin/python tools/ls/browser_shot.py URL PROJECT TASK TEXT OUT.png

``TEXT`` is what the page must show before the shot (a caption or an answer in a TextArea).  With
``--data-manager`` the project's Data Manager table (``/projects/PROJECT/data``) is shot instead,
once ``TEXT`` (e.g. a prediction score) is on the page; ``TASK`` is then ignored.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait


def browser(user_data: str, size: str = "1400,900") -> webdriver.Chrome:
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--window-size={size}",
        f"--user-data-dir={user_data}",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def wait_for_text(driver: webdriver.Chrome, text: str, timeout: float = 60) -> None:
    """Wait until some input/textarea of the page holds ``text`` or the page's visible text has it."""
    script = (
        "return Array.from(document.querySelectorAll('textarea, input')).map(e => e.value || '')"
        ".concat([document.body ? document.body.innerText : ''])"
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(text in value for value in driver.execute_script(script)):
            return
        time.sleep(1)
    raise RuntimeError(f"{text!r} never appeared on the labeling page")


def scroll_to_text(driver: webdriver.Chrome, text: str) -> bool:
    """Scroll the innermost element showing ``text`` (value or visible text) into view."""
    script = """
        const text = arguments[0];
        const hits = Array.from(document.querySelectorAll('body *')).filter(e =>
            (e.value || '').includes(text)
            || (e.children.length === 0 && (e.innerText || '').includes(text)));
        if (!hits.length) return false;
        hits[hits.length - 1].scrollIntoView({block: 'end'});
        return true;"""
    return bool(driver.execute_script(script, text))


def select_first_region(driver: webdriver.Chrome) -> bool:
    """Click the first entry of the region list so the box is highlighted with its details."""
    from selenium.common.exceptions import WebDriverException

    for css in (".lsf-outliner-item__title", ".lsf-outliner-item__content", "[class*=outliner-item]"):
        for node in driver.find_elements(By.CSS_SELECTOR, css):
            try:
                node.click()
                return True
            except WebDriverException:
                continue
    return False


def shoot(
    url: str,
    project: int,
    task: int,
    caption: str,
    out: Path,
    data_manager: bool = False,
    size: str = "1400,900",
) -> None:
    with tempfile.TemporaryDirectory() as profile:
        driver = browser(profile, size)
        try:
            driver.get(f"{url}/user/login")
            WebDriverWait(driver, 30).until(ec.presence_of_element_located((By.NAME, "email"))).send_keys(
                os.environ["LS_USER"]
            )
            driver.find_element(By.NAME, "password").send_keys(os.environ["LS_PASSWORD"])
            driver.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
            WebDriverWait(driver, 30).until(lambda d: "/user/login" not in d.current_url)
            if data_manager:
                driver.get(f"{url}/projects/{project}/data")
                wait_for_text(driver, caption)
                selected = False
            else:
                driver.get(f"{url}/projects/{project}/data?task={task}")
                wait_for_text(driver, caption)
                selected = select_first_region(driver)
                scroll_to_text(driver, caption)
            time.sleep(3)  # thumbnails and the last layout pass
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
            print(f"screenshot {out} (region selected: {selected})")
        finally:
            driver.quit()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("url")
    ap.add_argument("project", type=int)
    ap.add_argument("task", type=int)
    ap.add_argument("caption")
    ap.add_argument("out", type=Path)
    ap.add_argument("--data-manager", action="store_true", help="shoot the project's tasks table")
    ap.add_argument("--size", default="1400,900", help="window width,height")
    args = ap.parse_args()
    shoot(args.url.rstrip("/"), args.project, args.task, args.caption, args.out, args.data_manager, args.size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
