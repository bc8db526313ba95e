"""Debian's Chromium under Playwright (never a downloaded browser), and a page that records
every console error, uncaught exception and CSP violation so tests can assert there were none."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@dataclass
class PageProblems:
    """Console errors, page errors and Content-Security-Policy violations seen by a page."""

    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def watch(self, page: Any) -> None:
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

        def on_dialog(dialog: Any) -> None:  # e.g. an alert() an XSS payload would open
            self.dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        # CSP violations are reported as DOM events; collect them into a page global.
        page.add_init_script(
            "window.__cspViolations = [];"
            "document.addEventListener('securitypolicyviolation', e =>"
            " window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));"
        )

    def _on_console(self, msg: Any) -> None:
        if msg.type == "error":
            self.errors.append(f"console: {msg.text}")

    def check(self, page: Any) -> list[str]:
        """Everything that went wrong so far, CSP violations included."""
        violations = page.evaluate("window.__cspViolations || []")
        return self.errors + [f"csp: {v}" for v in violations]
