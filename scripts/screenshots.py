"""The README's dashboard screenshots, from real searches of the reference world.

Runs ``hmaopt demo --serve`` (the world's job on the embedded default; the world is built
or reused in DIR/world), submits a second job over REST (the same spec with a budget
``--tight`` times the world's), waits for both, then signs in with the demo's token in
headless Chromium (Debian's, driven by Playwright) and saves:

- docs/img/dashboard_job.png: the live job page of the demo's job;
- docs/img/dashboard_compare.png: the compare page of both jobs.

    .venv/bin/python scripts/screenshots.py [--dir demo] [--tight 0.5]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="demo", help="the demo folder (default ./demo)")
    ap.add_argument("--tight", type=float, default=0.5,
                    help="the second job's budget, as a fraction of the world's")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from service.client import Client
    from service.spec import load_spec

    folder = Path(args.dir).resolve()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "screenshots-demo.log", "w")
    demo = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "demo", "--dir", str(folder), "--serve",
         "--port", str(port), "--no-progress"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    try:
        token_file = folder / "service" / "demo.token"
        first = None
        while first is None:  # the demo prints its job's URL once the job has ended
            if demo.poll() is not None:
                raise SystemExit(f"hmaopt demo exited with {demo.returncode}; see {log.name}")
            time.sleep(2)
            text = Path(log.name).read_text()
            if "serving on" in text:
                first = text.split(f"{url}/v1/jobs/", 1)[1].split()[0]
        client = Client(url, token_file.read_text().strip())
        spec = load_spec(folder / "world" / "spec.yaml", resolve=True)
        spec = spec.model_dump(mode="json")
        spec["name"] = f"{spec['name']}-tight-budget"
        spec["tax"]["budget"] = round(spec["tax"]["budget"] * args.tight, 6)
        second = client.submit(spec)["id"]
        final = client.wait(second)
        print(f"jobs {first} and {second} ({final['status']})")
        out = Path(args.out)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/ui/signin?next=/ui/jobs/{first}")
            page.fill("#token", token_file.read_text().strip())
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/ui/jobs/{first}")
            page.wait_for_function("() => document.getElementById('profile').data")
            page.wait_for_timeout(1500)
            page.screenshot(path=out / "dashboard_job.png", full_page=True)
            page.goto(f"{url}/ui/compare?jobs={first}&jobs={second}")
            page.wait_for_function("() => document.getElementById('profile').data")
            page.wait_for_timeout(1500)
            page.screenshot(path=out / "dashboard_compare.png", full_page=True)
            browser.close()
        print(f"wrote {out / 'dashboard_job.png'} and {out / 'dashboard_compare.png'}")
        return 0
    finally:
        os.killpg(demo.pid, signal.SIGTERM)
        demo.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
