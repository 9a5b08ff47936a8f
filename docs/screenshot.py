"""Takes docs/chat.png: a finished conversation on the chat page (an answer rendered from
Markdown, with a code block), served by `aserve serve` with the real default model, in Debian's
headless chromium.

    .venv/bin/python docs/screenshot.py [--out docs/chat.png]
"""

import argparse
import asyncio
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.async_api import async_playwright

TURNS = ["What is the capital of France? Answer in one sentence.",
         "Write a Python function that adds two numbers, in a code block."]


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "aserve", "serve", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("aserve did not start")


async def shoot(url: str, out: Path) -> None:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path="/usr/bin/chromium",
                                          args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = await browser.new_page(viewport={"width": 1000, "height": 1150})
        await page.goto(url + "/")
        await page.wait_for_function("document.querySelector('#model').options.length > 0")
        await page.fill("#system", "You are a concise, friendly assistant.")
        await page.fill("#temperature", "0")
        await page.fill("#max-tokens", "120")
        for n, turn in enumerate(TURNS, 1):
            await page.fill("#prompt", turn)
            await page.click("#send")
            await page.wait_for_function(
                f"[...document.querySelectorAll('.msg.assistant .stats')].filter(s => s.textContent).length >= {n}",
                timeout=120_000)
        await page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        await page.screenshot(path=str(out))  # the viewport: sticky parts stay where a reader sees them
        await browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "chat.png")
    args = parser.parse_args()
    proc, url = start_server()
    try:
        asyncio.run(shoot(url, args.out))
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
