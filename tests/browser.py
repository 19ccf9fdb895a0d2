"""Pages as a person sees them: Debian's headless Chromium driven by Selenium through Debian's
chromedriver (the two ship at the same version; nothing is downloaded).

    with browser() as driver:
        shot = render(driver, Path("reports/index.html"), tmp_path / "report")
        assert shot.console_errors == [] and all(shot.decoded(img) for img in shot.images)

`make test` installs chromium and chromium-driver when they are absent. Set SCREENSHOT_DIR to keep
every screenshot the tests take, to look at them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromedriver are not installed (`make test` installs them)"
)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)
LAPTOP = (1440, 900)

# Every <img>: where it is on the page, whether it decoded, and its natural size.
IMAGES_JS = """
return Array.from(document.images).map(function (img) {
  var r = img.getBoundingClientRect();
  return {alt: img.alt, x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width,
          height: r.height, complete: img.complete, natural_width: img.naturalWidth,
          natural_height: img.naturalHeight};
});
"""


@contextlib.contextmanager
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages and JS errors
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@dataclass
class Shot:
    first_screen: Image.Image  # the viewport as the page opens
    full_page: Image.Image
    images: list  # IMAGES_JS's records, in page coordinates of full_page
    console_errors: list  # SEVERE console entries: JS errors, failed loads, console.error

    def decoded(self, image: dict) -> bool:
        """The image loaded, and its box on the screenshot is not blank."""
        if not image["complete"] or image["natural_width"] == 0 or image["width"] < 2:
            return False
        box = (
            round(image["x"]),
            round(image["y"]),
            round(image["x"] + image["width"]),
            round(image["y"] + image["height"]),
        )
        pixels = np.asarray(self.full_page.crop(box).convert("L"), dtype=float)
        return pixels.size > 0 and pixels.std() > 5.0


def _viewport(driver, width: int, height: int) -> None:
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )


def _screenshot(driver, path: Path) -> Image.Image:
    driver.save_screenshot(str(path))
    keep = os.environ.get("SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    image = Image.open(path)
    image.load()
    return image


def render(driver, page: Path, out: Path, size: tuple = LAPTOP) -> Shot:
    """Open `page` at `size`, screenshot the first screen and the whole page (files `out`-*.png)."""
    driver.get_log("browser")  # drop what an earlier page logged
    _viewport(driver, *size)
    driver.get(page.resolve().as_uri())
    first = _screenshot(driver, out.with_name(out.name + "-screen.png"))
    height = driver.execute_script("return document.documentElement.scrollHeight")
    _viewport(driver, size[0], max(size[1], height))
    full = _screenshot(driver, out.with_name(out.name + "-full.png"))
    images = driver.execute_script(IMAGES_JS)
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    return Shot(first, full, images, errors)
