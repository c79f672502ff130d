"""Screenshot a page of a running Ray dashboard with headless Chromium (makes docs/dashboard.png).

Why this script exists: Ray turns token authentication on by default, so the dashboard's
API answers 401 to a browser without the `ray-authentication-token` cookie, and a plain
`chromium --headless --screenshot URL` only captures the token dialog. This script starts
Chromium with its DevTools protocol, sets that cookie to the cluster's token (the one
`ray get-auth-token` prints: $RAY_AUTH_TOKEN, the file in $RAY_AUTH_TOKEN_PATH, or
~/.ray/auth_token), opens the page, lets the React app render, and saves a PNG. It talks
to Chromium with aiohttp, which Ray already installs; it never turns authentication off.

    python docs/screenshot.py 'http://127.0.0.1:8265/#/jobs' docs/dashboard.png [--wait 12] [--scroll-to TEXT]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp


def ray_token() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).read_text().strip()


# Brings the last, innermost element whose text contains TEXT into view. A long log sits in a
# virtualized scroll box that only renders the lines in view, so such boxes are scanned from
# their end and the hit is scrolled to the box's top (the page itself stays where it is).
SCROLL_JS = """(async text => {
  const find = () => [...document.querySelectorAll('body *')].filter(e => e.textContent.includes(text)
      && ![...e.children].some(c => c.textContent.includes(text))).pop();
  const boxes = [...document.querySelectorAll('body *')].filter(e => e.scrollHeight > e.clientHeight + 5
      && ['auto', 'scroll'].includes(getComputedStyle(e).overflowY));
  for (const box of boxes) {
    for (let top = box.scrollHeight; top > -box.clientHeight; top -= box.clientHeight / 2) {
      box.scrollTop = top;
      await new Promise(r => setTimeout(r, 30));
      const hit = find();
      if (hit && box.contains(hit)) {
        box.scrollTop += hit.getBoundingClientRect().top - box.getBoundingClientRect().top;
        return true;
      }
    }
  }
  const hit = find();
  if (hit) hit.scrollIntoView({block: 'center'});
  return !!hit;
})(%s)"""


async def shoot(url: str, out: Path, width: int, height: int, wait: float, chromium: str,
                scroll_to: str | None = None) -> None:
    base = "{0.scheme}://{0.netloc}/".format(urlsplit(url))
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.time() + 30
            while not (port_file.exists() and port_file.read_text().strip()):
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("Chromium did not open its DevTools port")
                await asyncio.sleep(0.2)
            port = port_file.read_text().split()[0]
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                    page = next(t for t in await r.json() if t["type"] == "page")
                async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    ids = itertools.count(1)

                    async def cdp(method: str, **params):
                        i = next(ids)
                        await ws.send_json({"id": i, "method": method, "params": params})
                        while True:  # skip events until our reply
                            msg = await ws.receive_json()
                            if msg.get("id") == i:
                                if "error" in msg:
                                    raise RuntimeError(f"{method}: {msg['error']}")
                                return msg.get("result", {})

                    await cdp("Network.enable")
                    await cdp("Network.setCookie", name="ray-authentication-token",
                              value=ray_token(), url=base, httpOnly=True, sameSite="Strict")
                    await cdp("Emulation.setDeviceMetricsOverride", width=width, height=height,
                              deviceScaleFactor=1, mobile=False)
                    await cdp("Page.navigate", url=url)
                    await asyncio.sleep(wait)  # the dashboard polls its API; let it fill in
                    if scroll_to:
                        found = await cdp("Runtime.evaluate", expression=SCROLL_JS % json.dumps(scroll_to),
                                          awaitPromise=True)
                        if not found.get("result", {}).get("value"):
                            print(f"warning: {scroll_to!r} not found on the page")
                        await asyncio.sleep(1)
                    shot = await cdp("Page.captureScreenshot", format="png")
            out.write_bytes(base64.b64decode(shot["data"]))
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="dashboard page, e.g. http://127.0.0.1:8265/#/jobs")
    p.add_argument("out", type=Path, help="PNG to write")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=900)
    p.add_argument("--wait", type=float, default=12.0, help="seconds to let the page render")
    p.add_argument("--scroll-to", metavar="TEXT", help="scroll the last element with TEXT into view")
    p.add_argument("--chromium", default="chromium")
    a = p.parse_args()
    asyncio.run(shoot(a.url, a.out, a.width, a.height, a.wait, a.chromium, a.scroll_to))
    print(f"wrote {a.out} ({a.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
