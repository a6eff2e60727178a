"""The web console (crates/server/console, served at https://<hub>/) in a real browser.

Debian's chromium, headless, driven by playwright-core (node/console_browser.mjs, one
long-lived process per module taking one JSON command per line) against a real `twinhub serve`
on its loopback address. The browser checks TLS: it accepts exactly the hub's own server key
(--ignore-certificate-errors-spki-list with the SPKI hash of the hub's tls/server.pem), not any
certificate. Devices are the official Python SDK (azure-iot-device, MQTT/TLS on 8883), driven
from here between browser steps.

scripts/test-interop.sh finds or installs the browser (scripts/chromium-env.sh, exported as
TWINHUB_CHROMIUM) and the Node packages (TWINHUB_NODE_MODULES); a pytest run started by hand
runs both scripts itself. Nothing here skips: no browser is a failure.

Every test runs in a fresh browser context and, at its end, asserts what any page must never
do: a browser console error or page error (except the HTTP errors the test expects), a request
to anything but the hub's own origin (the console must work offline), a failed request other
than a stream the console aborted itself, or the policy's SharedAccessKey in any request's URL,
headers or body. A failure reports the page's visible text, the browser's console errors and
a screenshot (under target/console-screenshots/failures/). Screenshots of every view are saved
under target/console-screenshots/.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from harness import REPO, Hub, random_key, unique_id
from node_runner import NODE_DIR, node_binary, node_modules

CHROMIUM_ENV_SCRIPT = REPO / "scripts" / "chromium-env.sh"
SCREENSHOTS = REPO / "target" / "console-screenshots"
LAUNCH_TIMEOUT_S = 90.0
# What the driver may add to an op's own timeout: a failure's diagnostics and screenshot.
ANSWER_SLACK_S = 25.0
DEFAULT_WAIT_S = 10.0

# Console messages Chromium writes by itself for every HTTP error a fetch() gets, e.g.
# "Failed to load resource: the server responded with a status of 401 ()". They are errors
# only where a test did not mean to provoke that status (see Page.expect_http_errors).
HTTP_ERROR_MESSAGE = re.compile(r"Failed to load resource: the server responded with a status of (\d{3})")

_chromium: str | None = None


def chromium_executable() -> str:
    """The browser of scripts/chromium-env.sh: $TWINHUB_CHROMIUM, else the script's answer
    (which installs Debian's chromium when run as root, and fails otherwise)."""
    global _chromium
    if _chromium is not None:
        return _chromium
    given = os.environ.get("TWINHUB_CHROMIUM")
    if given:
        if not os.access(given, os.X_OK):
            raise AssertionError(f"TWINHUB_CHROMIUM={given} is not an executable")
        _chromium = given
        return given
    res = subprocess.run(
        [str(CHROMIUM_ENV_SCRIPT)], stdin=subprocess.DEVNULL, capture_output=True, timeout=900
    )
    if res.returncode != 0:
        raise AssertionError(
            f"{CHROMIUM_ENV_SCRIPT} exited {res.returncode}:\n{res.stderr.decode(errors='replace')}"
        )
    _chromium = res.stdout.decode().strip().splitlines()[-1]
    return _chromium


# --------------------------------------------------------------------------------------------
# Locator specs (see node/console_browser.mjs): one step or a list of steps, outermost first
# --------------------------------------------------------------------------------------------


def role(
    kind: str, name: str | None = None, *, exact: bool = False, name_re: str | None = None, **extra: Any
) -> dict[str, Any]:
    step: dict[str, Any] = {"role": kind}
    if name is not None:
        step["name"] = name
    if name_re is not None:
        step["nameRe"] = name_re
    if exact:
        step["exact"] = True
    step.update(extra)
    return step


def label(text: str, *, exact: bool = False, **extra: Any) -> dict[str, Any]:
    return {"label": text, "exact": exact, **extra}


def text(value: str, *, exact: bool = False, **extra: Any) -> dict[str, Any]:
    return {"text": value, "exact": exact, **extra}


def css(selector: str, **extra: Any) -> dict[str, Any]:
    return {"css": selector, **extra}


NAV = role("navigation", "Main")
SIGN_IN = role("button", "Sign in")
SIGN_OUT = role("button", "Sign out")
CS_FIELD = label("Connection string", exact=True)
ALERT = role("alert")


# --------------------------------------------------------------------------------------------
# The driver process
# --------------------------------------------------------------------------------------------


class BrowserError(AssertionError):
    """A browser step failed; the message holds the page's text, console errors, screenshot."""


def _format_diag(diag: dict[str, Any] | None) -> str:
    if not diag:
        return "(no diagnostics)"
    parts = [f"page URL: {diag.get('url')}", f"failure screenshot: {diag.get('screenshot')}"]
    console = diag.get("console") or []
    parts.append(
        "browser console errors/warnings:"
        + ("".join(f"\n  [{m.get('type')}] {m.get('text')} ({m.get('url')})" for m in console) or " (none)")
    )
    page_errors = diag.get("pageErrors") or []
    parts.append("page errors:" + ("".join(f"\n  {e}" for e in page_errors) or " (none)"))
    failed = diag.get("failedRequests") or []
    if failed:
        parts.append(
            "failed requests:"
            + "".join(f"\n  {f.get('method')} {f.get('url')}: {f.get('failure')}" for f in failed)
        )
    parts.append(f"visible text of the page:\n{diag.get('text')}")
    return "\n".join(parts)


class Browser:
    """node/console_browser.mjs: chromium launched once, commands answered one line each."""

    def __init__(self, hub: Hub, workdir: Path) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        # Failure screenshots left are this run's only.
        shutil.rmtree(SCREENSHOTS / "failures", ignore_errors=True)
        self.stderr_path = workdir / "console_browser.stderr"
        self._stderr = self.stderr_path.open("wb")
        env = dict(os.environ)
        env["TWINHUB_NODE_MODULES"] = str(node_modules())
        # The browser trusts the hub through the SPKI pin only; Node itself makes no TLS calls.
        for var in ("NODE_TLS_REJECT_UNAUTHORIZED", "NODE_EXTRA_CA_CERTS"):
            env.pop(var, None)
        self.proc = subprocess.Popen(
            [
                node_binary(),
                str(NODE_DIR / "console_browser.mjs"),
                "--chromium",
                chromium_executable(),
                "--server-cert",
                str(hub.tls_dir / "server.pem"),
                "--out",
                str(SCREENSHOTS),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            cwd=str(NODE_DIR),
            start_new_session=True,  # its own process group: chromium dies with it
        )
        self._answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._next_id = 0
        threading.Thread(target=self._read, name="console-browser-stdout", daemon=True).start()
        first = self._answer(LAUNCH_TIMEOUT_S, "the browser to start")
        if first.get("type") != "ready":
            self.kill()
            raise BrowserError(f"the browser did not start: {first}\n{self.stderr_tail()}")
        self.version = first.get("version")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                obj = json.loads(raw)
            except ValueError:
                obj = {"type": "garbage", "line": raw.decode(errors="replace")}
            if isinstance(obj, dict) and obj.get("type") != "garbage":
                self._answers.put(obj)
        self._answers.put(None)

    def _answer(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            got = self._answers.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise BrowserError(
                f"no answer from the browser driver within {timeout:.0f}s for {what}; killed it\n"
                f"{self.stderr_tail()}"
            ) from None
        if got is None:
            rc = self.proc.wait(timeout=10)
            raise BrowserError(f"the browser driver exited ({rc}) during {what}\n{self.stderr_tail()}")
        return got

    def call(self, op: str, *, timeout: float = DEFAULT_WAIT_S, diag_name: str = "", **args: Any) -> Any:
        """Runs one op; its waits are bounded by `timeout` seconds (the answer by a little more)."""
        __tracebackhide__ = True
        if self.proc.poll() is not None:
            raise BrowserError(
                f"the browser driver is gone (exit {self.proc.returncode})\n{self.stderr_tail()}"
            )
        self._next_id += 1
        cmd = {"id": self._next_id, "op": op, "timeout": int(timeout * 1000), "diagName": diag_name, **args}
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise BrowserError(f"the browser driver closed its input\n{self.stderr_tail()}") from None
        shown = {k: v for k, v in cmd.items() if k not in ("id", "diagName")}
        while True:
            answer = self._answer(timeout + ANSWER_SLACK_S, f"{json.dumps(shown)[:300]}")
            if answer.get("id") == self._next_id:
                break
        if not answer.get("ok"):
            raise BrowserError(
                f"browser step failed: {json.dumps(shown)[:500]}\n{answer.get('error')}\n"
                f"{_format_diag(answer.get('diag'))}"
            )
        return answer.get("result")

    def stderr_tail(self, lines: int = 40) -> str:
        try:
            tail = self.stderr_path.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            return "(no driver stderr)"
        return "driver stderr (tail):\n" + ("\n".join(tail) or "(empty)")

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("close", timeout=15)
                self.proc.wait(timeout=20)
        except (BrowserError, subprocess.TimeoutExpired):
            pass
        finally:
            # Chromium's helpers share the driver's process group; none may outlive the module.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.kill()
            self._stderr.close()


class Page:
    """One test's browser context on the hub, with the checks every page must pass."""

    def __init__(self, browser: Browser, hub: Hub, name: str) -> None:
        self.browser = browser
        self.hub = hub
        self.name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        self.origin = f"https://{hub.ip}" if hub.https_port == 443 else f"https://{hub.ip}:{hub.https_port}"
        self.expected_http_errors: set[int] = set()
        self.secrets: list[str] = []
        self.browser.call("newPage", timeout=30)

    # ---- steps -----------------------------------------------------------------------------

    def call(self, op: str, **args: Any) -> Any:
        __tracebackhide__ = True
        return self.browser.call(op, diag_name=self.name, **args)

    def goto(self, path: str = "/", timeout: float = 20) -> None:
        self.call("goto", url=self.origin + path, timeout=timeout)

    def fill(self, loc: Any, value: str, timeout: float = DEFAULT_WAIT_S) -> None:
        self.call("fill", loc=loc, value=value, timeout=timeout)

    def click(self, loc: Any, timeout: float = DEFAULT_WAIT_S) -> None:
        self.call("click", loc=loc, timeout=timeout)

    def select(
        self, loc: Any, *, label: str | None = None, value: str | None = None, timeout: float = DEFAULT_WAIT_S
    ) -> None:
        args: dict[str, Any] = {"label": label} if label is not None else {"value": value}
        self.call("select", loc=loc, timeout=timeout, **args)

    def visible(self, loc: Any, timeout: float = DEFAULT_WAIT_S) -> None:
        self.call("waitFor", loc=loc, state="visible", timeout=timeout)

    def gone(self, loc: Any, timeout: float = DEFAULT_WAIT_S) -> None:
        self.call("waitFor", loc=loc, state="hidden", timeout=timeout)

    def wait_text(
        self,
        loc: Any,
        *contains: str,
        absent: tuple[str, ...] = (),
        regex: str | None = None,
        timeout: float = DEFAULT_WAIT_S,
    ) -> str:
        """Polls the element's (or the page's, loc=None) visible text until it holds every string."""
        args: dict[str, Any] = {"contains": list(contains), "absent": list(absent)}
        if loc is not None:
            args["loc"] = loc
        if regex is not None:
            args["re"] = regex
        return self.call("waitText", timeout=timeout, **args)

    def text(self, loc: Any = None, timeout: float = DEFAULT_WAIT_S) -> str:
        return self.call("text", timeout=timeout, **({"loc": loc} if loc is not None else {}))

    def value(self, loc: Any, timeout: float = DEFAULT_WAIT_S) -> str:
        return self.call("value", loc=loc, timeout=timeout)

    def count(self, loc: Any) -> int:
        return self.call("count", loc=loc)

    def attr(self, loc: Any, name: str, timeout: float = DEFAULT_WAIT_S) -> str | None:
        return self.call("attr", loc=loc, name=name, timeout=timeout)

    def eval(self, expr: str) -> Any:
        return self.call("eval", expr=expr)

    def screenshot(self, name: str, full_page: bool = True) -> Path:
        return Path(self.call("screenshot", name=name, fullPage=full_page, timeout=20))

    def storage(self) -> dict[str, dict[str, str]]:
        """{"session": {...}, "local": {...}} of the page's origin."""
        return self.eval(
            "(() => { const all = (s) => Object.fromEntries(Object.keys(s).map((k) => [k, s.getItem(k)]));"
            " return { session: all(sessionStorage), local: all(localStorage) }; })()"
        )

    def sign_in(self, cs: str, *, wait_shell: bool = True) -> None:
        """Signs in on the sign-in form (loading the page first when it is not shown)."""
        if "SharedAccessKey=" in cs:
            self.secrets.append(cs.split("SharedAccessKey=", 1)[1].split(";", 1)[0])
        if self.count(CS_FIELD) == 0:
            self.goto("/")
        self.fill(CS_FIELD, cs)
        self.click(SIGN_IN)
        if wait_shell:
            self.visible(NAV, timeout=15)

    def nav(self, name: str) -> None:
        """Follows a link of the main navigation and waits for the view's heading."""
        self.click([NAV, role("link", name, exact=True)])
        self.visible(role("heading", name, exact=True, level=1), timeout=15)

    def open_device(self, device_id: str, tab: str | None = None) -> None:
        """The device view (#/devices/<id>), then one of its tabs."""
        self.eval(f"location.hash = {json.dumps('#/devices/' + device_id)}")
        self.visible(role("heading", device_id, exact=True, level=1), timeout=15)
        if tab is not None:
            self.click(role("tab", tab, exact=True))
            self.visible(role("tabpanel", tab, exact=True))

    def expect_http_errors(self, *statuses: int) -> None:
        """This test provokes these HTTP statuses: Chromium's console lines for them are fine."""
        self.expected_http_errors.update(statuses)

    # ---- checks ----------------------------------------------------------------------------

    def log(self) -> dict[str, Any]:
        return self.call("log", timeout=20)

    def problems(self) -> list[str]:
        """What this page did that no page may: see the module docstring."""
        log = self.log()
        found: list[str] = []
        for m in log["console"]:
            if m["type"] != "error":
                continue
            http = HTTP_ERROR_MESSAGE.search(m["text"])
            if http and int(http.group(1)) in self.expected_http_errors:
                continue
            found.append(f"browser console error: {m['text']} ({m['url']})")
        found += [f"page error: {e}" for e in log["pageErrors"]]
        for f in log["failedRequests"]:
            # A view closing its live stream (or a navigation cancelling a fetch) aborts it.
            if f["failure"] != "net::ERR_ABORTED":
                found.append(f"request failed: {f['method']} {f['url']}: {f['failure']}")
        for r in log["requests"]:
            url = r["url"]
            if not (
                url == self.origin
                or url.startswith(self.origin + "/")
                or url.startswith("data:")
                or url.startswith("blob:")
            ):
                found.append(f"request to another origin: {r['method']} {url}")
            for secret in self.secrets:
                where = [
                    part
                    for part, value in (
                        ("URL", url),
                        ("headers", json.dumps(r.get("headers") or {})),
                        ("body", r.get("body") or ""),
                    )
                    if secret in value
                ]
                if where:
                    found.append(
                        f"the policy's SharedAccessKey was sent in the {'/'.join(where)} of "
                        f"{r['method']} {url}"
                    )
        return found

    def failure_sections(self) -> list[tuple[str, str]]:
        """For conftest's failure report: the page as the test left it."""
        try:
            diag = self.browser.call("diag", name=self.name, timeout=20)
        except BrowserError as e:
            return [("console browser", f"(no diagnostics: {e})\n{self.browser.stderr_tail()}")]
        return [("console browser", _format_diag(diag) + "\n" + self.browser.stderr_tail(15))]


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    b = Browser(hub, tmp_path_factory.mktemp("console-browser"))
    yield b
    b.close()


@pytest.fixture
def page(browser: Browser, hub: Hub, request: pytest.FixtureRequest) -> Iterator[Page]:
    p = Page(browser, hub, request.node.name)
    yield p
    problems = p.problems()
    assert not problems, "the page misbehaved:\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def owner_cs(hub: Hub) -> str:
    return hub.service_cs("iothubowner")


class SdkDevice:
    """An official IoTHubDeviceClient (MQTT/TLS on 8883) that answers every direct method with
    ANSWER plus the payload it got, and keeps the calls, desired patches and C2D messages it
    receives in queues (each wait bounded)."""

    ANSWER = {"answeredBy": "azure-iot-device", "ok": True}

    def __init__(self, client: Any) -> None:
        from azure.iot.device import MethodResponse

        self.client = client
        self.methods: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.patches: queue.Queue[dict[str, Any]] = queue.Queue()
        self.messages: queue.Queue[Any] = queue.Queue()

        def on_method(request: Any) -> None:
            self.methods.put((request.name, request.payload))
            payload = {**self.ANSWER, "echo": request.payload}
            client.send_method_response(MethodResponse.create_from_method_request(request, 200, payload))

        client.connect()
        # Each setter subscribes before it returns.
        client.on_method_request_received = on_method
        client.on_twin_desired_properties_patch_received = self.patches.put
        client.on_message_received = self.messages.put

    @staticmethod
    def next(q: queue.Queue, what: str, timeout: float = 15.0) -> Any:
        __tracebackhide__ = True
        try:
            return q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the device got no {what} within {timeout}s") from None


@pytest.fixture
def sdk_device(hub: Hub, device_client):
    """Makes a connected SdkDevice: `sdk_device()` for a new device, or `sdk_device(cs)`."""

    def make(cs: str | None = None) -> tuple[str, SdkDevice]:
        if cs is None:
            cs = hub.device_cs(unique_id("web"))
        did = dict(part.split("=", 1) for part in cs.split(";"))["DeviceId"]
        return did, SdkDevice(device_client(cs))

    return make


# --------------------------------------------------------------------------------------------
# a. sign-in and sign-out
# --------------------------------------------------------------------------------------------


def test_sign_in_keeps_the_string_in_session_storage_only(page: Page, owner_cs: str):
    page.goto("/")
    page.visible(CS_FIELD)
    page.screenshot("signin")

    page.sign_in(owner_cs)
    shell = page.wait_text(NAV, "Overview", "Devices", "Jobs", "Routing", "Telemetry")
    assert shell
    page.visible(SIGN_OUT)
    header = page.text(css("header"))
    assert "iothubowner" in header, header

    key = owner_cs.split("SharedAccessKey=", 1)[1]
    stored = page.storage()
    assert owner_cs in stored["session"].values(), stored["session"]
    assert not any(key in v for v in stored["local"].values()), f"key in localStorage: {stored['local']}"

    # A reload keeps the session (the tab's sessionStorage), with no sign-in form.
    page.goto("/")
    page.visible(NAV, timeout=15)
    assert page.count(CS_FIELD) == 0

    # The calls the console made carry SAS tokens it signed, never the string or its key.
    requests_made = page.log()["requests"]
    api = [r for r in requests_made if "/twinhub/hub" in r["url"]]
    assert api, [r["url"] for r in requests_made]
    for r in api:
        auth = (r["headers"] or {}).get("authorization", "")
        assert auth.startswith("SharedAccessSignature sr="), r
        assert "skn=iothubowner" in auth, r
    leaks = [
        r["url"]
        for r in requests_made
        if key in r["url"] or key in json.dumps(r["headers"] or {}) or key in (r.get("body") or "")
    ]
    assert not leaks, f"the SharedAccessKey went out in: {leaks}"

    page.click(SIGN_OUT)
    page.visible(CS_FIELD)
    page.gone(NAV)
    stored = page.storage()
    assert not any(key in v for v in stored["session"].values()), stored["session"]
    assert not any(key in v for v in stored["local"].values()), stored["local"]
    # Signed out for good: a reload shows the sign-in form.
    page.goto("/")
    page.visible(CS_FIELD)
    assert page.count(NAV) == 0


# --------------------------------------------------------------------------------------------
# b. refused and malformed connection strings
# --------------------------------------------------------------------------------------------


def test_wrong_key_is_refused_in_iot_hub_words(page: Page, hub: Hub, owner_cs: str):
    page.expect_http_errors(401)
    good_key = owner_cs.split("SharedAccessKey=", 1)[1]
    bad_key = random_key()
    assert bad_key != good_key
    bad = owner_cs.replace(good_key, bad_key)

    page.sign_in(bad, wait_shell=False)
    message = page.wait_text(ALERT, "IotHubUnauthorizedAccess")
    assert "refused" in message, message
    assert page.count(NAV) == 0 and page.count(SIGN_OUT) == 0
    stored = page.storage()
    assert not any(bad_key in v for v in stored["session"].values()), stored
    page.screenshot("signin-refused")

    # A policy the hub does not have is refused the same way.
    unknown = owner_cs.replace("SharedAccessKeyName=iothubowner", "SharedAccessKeyName=nosuchpolicy")
    page.fill(CS_FIELD, unknown)
    page.click(SIGN_IN)
    page.wait_text(ALERT, "IotHubUnauthorizedAccess")
    assert page.count(NAV) == 0


@pytest.mark.parametrize(
    "entered,expected",
    [
        ("this is not a connection string", "is not a key=value pair"),
        ("HostName=h;SharedAccessKeyName=iothubowner", "SharedAccessKey"),
        ("HostName=h;SharedAccessKeyName=iothubowner;SharedAccessKey=***", "not base64"),
        ("HostName=h;DeviceId=d;SharedAccessKey=" + "QUJD" * 8, "device connection string"),
    ],
    ids=["prose", "no-key", "key-not-base64", "device-string"],
)
def test_malformed_connection_string_gets_a_message(page: Page, entered: str, expected: str):
    page.goto("/")
    page.fill(CS_FIELD, entered)
    page.click(SIGN_IN)
    message = page.wait_text(ALERT, expected)
    assert message.strip(), "an empty alert"
    assert page.count(NAV) == 0
    assert page.storage()["session"] == {}
    # The form stays usable with the text still there to correct.
    assert page.value(CS_FIELD) == entered


def test_a_policy_without_rights_sees_the_controls_disabled_and_why(page: Page, hub: Hub):
    did = unique_id("ro")
    hub.device_cs(did)  # creates it
    page.sign_in(hub.service_cs("registryRead"))
    note = page.wait_text(role("note"), "registryRead", "RegistryWrite", "ServiceConnect")
    assert "disabled" in note, note

    page.nav("Devices")
    new_device = role("button", "New device", exact=True)
    page.visible(new_device)
    assert page.attr(new_device, "disabled") is not None, "New device is enabled without RegistryWrite"
    assert "RegistryWrite" in (page.attr(new_device, "title") or "")

    page.open_device(did, "Direct method")
    invoke = role("button", "Invoke method", exact=True)
    assert page.attr(invoke, "disabled") is not None, "Invoke method is enabled without ServiceConnect"
    assert "ServiceConnect" in (page.attr(invoke, "title") or "")
    page.screenshot("rights-registryRead")


# --------------------------------------------------------------------------------------------
# c. create a device; the official SDK connects with the string the console showed
# --------------------------------------------------------------------------------------------


def device_row(device_id: str) -> list[dict[str, Any]]:
    return [role("table", "Devices"), role("row", hasText=device_id)]


def test_create_a_device_and_watch_it_connect(page: Page, hub: Hub, owner_cs: str, sdk_device):
    did = unique_id("ui")
    page.sign_in(owner_cs)
    page.nav("Devices")
    # The list shows this device alone, whatever else the module's hub holds.
    page.fill(label("Query", exact=True), f"SELECT * FROM devices WHERE deviceId = '{did}'")
    page.click(role("button", "Run query", exact=True))
    page.wait_text(None, "No devices match this query.")

    page.click(role("button", "New device", exact=True))
    page.fill(label("Device ID", exact=True), did)
    page.click(role("button", "Create", exact=True))
    created = page.wait_text(role("form", "New device"), f"Created device {did}", "SharedAccessKey=")
    shown = page.text([role("form", "New device"), css("code")])
    assert shown.startswith(f"HostName={hub.hostname};DeviceId={did};SharedAccessKey="), created
    # The notice's Copy button copies that same string, and so does the list's.
    page.click([role("form", "New device"), role("button", f"Copy connection string of {did}")])
    assert page.eval("navigator.clipboard.readText()") == shown
    page.eval("navigator.clipboard.writeText('')")
    row = device_row(did)
    page.wait_text(row, "Enabled", "Disconnected", "Symmetric key")
    page.click([row, role("button", f"Copy connection string of {did}")])
    page.wait_text(row, "Copied")
    assert page.eval("navigator.clipboard.readText()") == shown
    page.screenshot("devices-created")

    # The official device SDK connects with the string the console showed.
    _, device = sdk_device(shown)
    page.wait_text(row, "Connected", absent=("Disconnected",), timeout=15)
    page.screenshot("devices-connected")
    device.client.disconnect()
    page.wait_text(row, "Disconnected", timeout=15)


# --------------------------------------------------------------------------------------------
# d. a direct method from the device view
# --------------------------------------------------------------------------------------------


def test_invoke_a_direct_method(page: Page, owner_cs: str, sdk_device):
    did, device = sdk_device()
    page.sign_in(owner_cs)
    page.open_device(did, "Identity")
    page.wait_text(css(".device-pills"), "Connected", absent=("Disconnected",), timeout=15)

    page.click(role("tab", "Direct method", exact=True))
    page.fill(label("Method name", exact=True), "setInterval")
    page.fill(label("Payload", exact=True), json.dumps({"seconds": 7, "unit": "s"}))
    page.click(role("button", "Invoke method", exact=True))
    result = page.wait_text(
        role("region", "Method result"), "Status 200", '"answeredBy": "azure-iot-device"', timeout=20
    )
    assert '"seconds": 7' in result, result
    assert SdkDevice.next(device.methods, "method call") == ("setInterval", {"seconds": 7, "unit": "s"})
    page.screenshot("device-method-answered")

    # An offline device: the hub's 404 (DeviceNotOnline, 404103), shown in IoT Hub's words.
    page.expect_http_errors(404)
    device.client.disconnect()
    page.wait_text(css(".device-pills"), "Disconnected", timeout=15)
    page.click(role("button", "Invoke method", exact=True))
    page.wait_text(role("region", "Method result"), "DeviceNotOnline", timeout=20)


# --------------------------------------------------------------------------------------------
# e. the twin: a desired property reaches the device; an etag conflict is resolved
# --------------------------------------------------------------------------------------------


def desired_of(hub: Hub, device_id: str) -> dict[str, Any]:
    r = hub.rest("GET", f"/twins/{device_id}")
    assert r.status_code == 200, r.text
    return {k: v for k, v in r.json()["properties"]["desired"].items() if not k.startswith("$")}


def test_edit_desired_properties_and_resolve_a_conflict(page: Page, hub: Hub, owner_cs: str, sdk_device):
    did, device = sdk_device()
    page.sign_in(owner_cs)
    page.open_device(did, "Twin")
    twin = role("region", "Twin", exact=True)
    page.wait_text(twin, "Twin version", "ETag")
    desired = label("Desired properties", exact=True)
    assert json.loads(page.value(desired)) == {}

    page.fill(desired, json.dumps({"fan": "on", "speed": 3}))
    page.click(role("button", "Save twin", exact=True))
    page.wait_text(twin, "Saved: the twin is now version")
    patch = SdkDevice.next(device.patches, "desired patch")
    assert patch["fan"] == "on" and patch["speed"] == 3, patch
    page.screenshot("device-twin-saved")

    # Someone else changes the twin behind the page's back; the page still holds the old etag.
    r = hub.rest(
        "PATCH",
        f"/twins/{did}",
        json_body={"properties": {"desired": {"mode": "eco"}}},
        headers={"If-Match": "*"},
    )
    assert r.status_code == 200, r.text
    assert SdkDevice.next(device.patches, "desired patch from REST").get("mode") == "eco"

    page.expect_http_errors(412)
    page.fill(desired, json.dumps({"fan": "off", "speed": 3}))
    page.click(role("button", "Save twin", exact=True))
    page.wait_text(twin, "The twin changed since you loaded it")
    page.screenshot("device-twin-conflict")
    assert desired_of(hub, did) == {"fan": "on", "speed": 3, "mode": "eco"}, "the stale save was applied"

    page.click(role("button", "Apply my changes to the latest", exact=True))
    page.wait_text(twin, "Saved: the twin is now version")
    patch = SdkDevice.next(device.patches, "desired patch after the conflict")
    assert patch.get("fan") == "off" and "mode" not in patch, patch
    # My change on top of the latest: the other writer's key stays.
    assert desired_of(hub, did) == {"fan": "off", "speed": 3, "mode": "eco"}
    assert json.loads(page.value(desired)) == {"fan": "off", "speed": 3, "mode": "eco"}


# --------------------------------------------------------------------------------------------
# f. live telemetry in the device view
# --------------------------------------------------------------------------------------------


def test_live_telemetry_of_a_device(page: Page, owner_cs: str, sdk_device):
    from azure.iot.device import Message

    did, device = sdk_device()
    page.sign_in(owner_cs)
    page.open_device(did, "Telemetry")
    page.wait_text(role("tabpanel", "Telemetry"), "Listening", timeout=15)

    marker = unique_id("reading")
    msg = Message(json.dumps({"temperature": 21.5, "marker": marker}))
    msg.content_type = "application/json"
    msg.content_encoding = "utf-8"
    msg.custom_properties["source"] = "console-test"
    device.client.send_message(msg)

    live = role("log", "Live telemetry")
    shown = page.wait_text(live, marker, "source=console-test", timeout=15)
    assert '"temperature": 21.5' in shown, shown
    page.screenshot("device-telemetry-live")

    # The hub-wide view, for this device from the earliest retained message: the same message.
    page.nav("Telemetry")
    # The view listens to all devices from now as it opens; Start is enabled once stopped.
    page.wait_text(role("status"), "Listening", "all devices", timeout=15)
    page.click(role("button", "Stop", exact=True))
    page.fill(label("Device ID", exact=True), did)
    page.select(label("From", exact=True), label="Earliest retained")
    page.click(role("button", "Start", exact=True))
    status = page.wait_text(role("status"), "Listening", did, timeout=15)
    assert "earliest" in status, status
    article = [live, role("article", f"Message from {did}", hasText=marker)]
    page.wait_text(article, marker, "Application properties (1)", timeout=15)
    page.click([article, text("Application properties (1)")])
    page.wait_text(article, "source", "console-test")

    # And one sent now arrives live, newest first.
    later = unique_id("reading")
    device.client.send_message(Message(json.dumps({"temperature": 22.0, "marker": later})))
    shown = page.wait_text(live, later, marker, timeout=15)
    assert shown.index(later) < shown.index(marker), "the newest message is not first"
    page.screenshot("telemetry-live")


# --------------------------------------------------------------------------------------------
# h. cloud-to-device
# --------------------------------------------------------------------------------------------


def test_send_a_cloud_to_device_message(page: Page, owner_cs: str, sdk_device):
    did, device = sdk_device()
    page.sign_in(owner_cs)
    page.open_device(did, "Cloud-to-device")
    body = f"hello from the console {unique_id('c2d')}"
    page.fill(label("Message body", exact=True), body)
    page.fill(label("Properties (JSON object of strings)", exact=True), json.dumps({"kind": "greeting"}))
    page.click(role("button", "Send message", exact=True))
    page.wait_text(role("tabpanel", "Cloud-to-device"), f"Queued for {did}")
    got = SdkDevice.next(device.messages, "cloud-to-device message")
    assert got.data.decode() == body
    assert got.custom_properties.get("kind") == "greeting", got.custom_properties
    page.screenshot("device-c2d-sent")


# --------------------------------------------------------------------------------------------
# g. a direct-method job from the Jobs view
# --------------------------------------------------------------------------------------------


def test_run_a_method_job_to_completion(page: Page, owner_cs: str, sdk_device):
    did, device = sdk_device()
    job_id = unique_id("webjob")
    page.sign_in(owner_cs)
    page.nav("Jobs")
    page.click(role("button", "New job", exact=True))
    form = role("form", "New job")
    page.fill(label("Job ID", exact=True), job_id)
    page.select(label("Job type", exact=True), label="Direct method")
    page.fill(label("Query condition", exact=True), f"deviceId = '{did}'")
    page.fill(label("Method name", exact=True), "blink")
    page.fill(label("Payload", exact=True), json.dumps({"times": 3}))
    page.screenshot("jobs-new")
    page.click([form, role("button", "Schedule job", exact=True)])

    row = [role("table", "Jobs"), role("row", hasText=job_id)]
    page.wait_text(row, "completed", timeout=30)
    results = page.wait_text(role("table", "Device results"), did, "Status 200", timeout=15)
    assert "answeredBy" in results, results
    assert SdkDevice.next(device.methods, "job's method call") == ("blink", {"times": 3})
    page.screenshot("jobs-completed")


# --------------------------------------------------------------------------------------------
# i. every view, light and dark, saved under target/console-screenshots/
# --------------------------------------------------------------------------------------------

# Each view and what it shows once its data has loaded (so the screenshot is not a spinner).
VIEWS: list[tuple[str, str, tuple[str, ...]]] = [
    ("Overview", "overview", ("Total devices", "Endpoints")),
    ("Devices", "devices", ("Page 1",)),
    ("Jobs", "jobs", ()),
    ("Routing", "routing", ()),
    ("Telemetry", "telemetry", ("Listening",)),
]
DEVICE_TABS: list[tuple[str, str, tuple[str, ...]]] = [
    ("Identity", "identity", ("Connection state", "Connected")),
    ("Twin", "twin", ("Twin version", "firmware")),
    ("Direct method", "method", ("Invoke method",)),
    ("Cloud-to-device", "c2d", ("Send message",)),
    ("Telemetry", "telemetry", ("Listening",)),
    ("Modules", "modules", ("Create module",)),
]


def background_luminance(page: Page) -> float:
    """The relative luminance (0 black .. 1 white) of the page's background colour."""
    rgb = page.eval("getComputedStyle(document.body).backgroundColor")
    r, g, b = (int(v) / 255 for v in re.findall(r"[\d.]+", rgb)[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_screenshots_of_every_view(page: Page, hub: Hub, owner_cs: str, sdk_device):
    from azure.iot.device import Message

    did, device = sdk_device()
    device.client.patch_twin_reported_properties({"firmware": "1.4.2", "battery": 88})
    r = hub.rest(
        "PATCH",
        f"/twins/{did}",
        headers={"If-Match": "*"},
        json_body={"tags": {"site": "lab"}, "properties": {"desired": {"interval": 30}}},
    )
    assert r.status_code == 200, r.text
    device.client.send_message(Message(json.dumps({"temperature": 20.5})))

    page.sign_in(owner_cs)
    for name, slug, ready in VIEWS:
        page.nav(name)
        page.wait_text(role("main"), *ready)
        if slug == "overview":
            # Rates need two samples of /metrics, 2 s apart.
            page.wait_text(role("group", "Messages/s"), regex=r"^\s*\d", timeout=15)
        assert page.count(ALERT) == 0, page.text(ALERT)
        page.screenshot(slug)
    # The overview counts this device as connected.
    page.nav("Overview")
    page.wait_text(role("group", "Connected devices"), regex=r"^\s*[1-9]")

    for tab, slug, ready in DEVICE_TABS:
        if tab == DEVICE_TABS[0][0]:
            page.open_device(did, tab)
        else:
            page.click(role("tab", tab, exact=True))
        panel = role("tabpanel", tab, exact=True)
        page.visible(panel)
        page.wait_text(panel, *ready, timeout=15)
        page.screenshot(f"device-{slug}")

    light = background_luminance(page)
    page.call("emulateMedia", colorScheme="dark")
    dark = background_luminance(page)
    assert dark < 0.2 < light, f"the dark scheme left the background at luminance {dark} (light: {light})"
    page.click(role("tab", "Twin", exact=True))
    page.screenshot("dark-device-twin")
    page.nav("Overview")
    page.wait_text(role("main"), "Total devices")
    page.screenshot("dark-overview")
