#!/usr/bin/env python3
"""Act as the person who approves (or denies) a device login on the local StandCloud.

It does over plain HTTP what a person does in a browser on the server in
interop/server.js: open the verification link, confirm the code, sign in
(any login), and allow or deny access.

    python interop/approve.py VERIFICATION_URI_COMPLETE [--deny] [--login NAME]
    python interop/approve.py VERIFICATION_URI --user-code CODE

    from approve import approve
    approve(flow["verification_uri_complete"], flow["user_code"])

Standard library only, Python 3.6 and later. It reads the
`<meta name="standcloud-step">` marker the server puts on each page and
submits the page's form, so it works only with interop/server.js.
"""

import argparse
import sys

try:  # Python 3
    from html.parser import HTMLParser
    from http.cookiejar import CookieJar
    from urllib.error import HTTPError
    from urllib.parse import urlencode, urljoin
    from urllib.request import HTTPCookieProcessor, Request, build_opener
except ImportError:  # pragma: no cover
    raise SystemExit("approve.py needs Python 3") from None

__all__ = ["approve", "ApproveError"]

_MAX_STEPS = 12


class ApproveError(Exception):
    """The pages did not lead where they should (unknown code, expired, ...)."""


class _Page(HTMLParser):
    """The step marker and the forms of one page (inputs and named buttons)."""

    def __init__(self):
        HTMLParser.__init__(self)
        self.step = None
        self.forms = []  # each: {"action", "method", "fields": [(name, value, type)], "buttons": [...]}
        self.errors = []
        self._form = None
        self._in_error = False

    def handle_starttag(self, tag, attrs):
        a = dict((k, v if v is not None else "") for k, v in attrs)
        if tag == "meta" and a.get("name") == "standcloud-step":
            self.step = a.get("content")
        elif tag == "form":
            self._form = {
                "action": a.get("action", ""),
                "method": a.get("method", "get").lower(),
                "fields": [],
                "buttons": [],
            }
            self.forms.append(self._form)
        elif tag == "input" and self._form is not None and a.get("name"):
            self._form["fields"].append((a["name"], a.get("value", ""), a.get("type", "text").lower()))
        elif tag == "button" and self._form is not None and a.get("name"):
            self._form["buttons"].append((a["name"], a.get("value", "")))
        elif tag == "p" and "error" in a.get("class", "").split():
            self._in_error = True

    def handle_endtag(self, tag):
        if tag == "form":
            self._form = None
        elif tag == "p":
            self._in_error = False

    def handle_data(self, data):
        if self._in_error and data.strip():
            self.errors.append(data.strip())


class _Browser(object):
    def __init__(self, timeout):
        self.opener = build_opener(HTTPCookieProcessor(CookieJar()))
        self.timeout = timeout

    def open(self, url, form=None):
        """GET (or POST a form), following redirects; returns (final URL, parsed page)."""
        data = urlencode(form).encode("ascii") if form is not None else None
        req = Request(url, data=data, headers={"Accept": "text/html"})
        try:
            resp = self.opener.open(req, timeout=self.timeout)
        except HTTPError as e:  # error pages still carry a step marker
            resp = e
        try:
            body = resp.read().decode("utf-8", "replace")
            final = resp.geturl()
        finally:
            resp.close()
        page = _Page()
        page.feed(body)
        page.close()
        return final, page


def _submit(browser, url, form, values, button=None):
    fields = [(n, v) for n, v, _ in form["fields"]]
    fields = [(n, values.get(n, v)) for n, v in fields]
    names = set(n for n, _ in fields)
    fields.extend((n, v) for n, v in values.items() if n not in names)
    if button is not None:
        fields.append(button)
    target = urljoin(url, form["action"] or url)
    if form["method"] != "post":
        raise ApproveError("unexpected %s form at %s" % (form["method"], url))
    return browser.open(target, fields)


def approve(verification_uri_complete, user_code=None, deny=False, login="operator", timeout=10.0):
    """Approve (or, with deny=True, deny) the device login behind the link.

    `verification_uri_complete` may also be the bare `verification_uri` when
    `user_code` is given. Returns "done" or "denied"; raises ApproveError when
    the server shows anything else (an unknown or expired code, for example).
    """
    browser = _Browser(timeout)
    url, page = browser.open(verification_uri_complete)
    for _ in range(_MAX_STEPS):
        step = page.step
        form = page.forms[0] if page.forms else None
        if step in ("done", "denied"):
            return step
        if step == "error" or (step is None and form is None):
            raise ApproveError("the server says: %s" % ("; ".join(page.errors) or "an error (step %r at %s)" % (step, url)))
        if step is None:
            # oidc-provider's self-submitting form (the `?user_code=` link): submit as is.
            url, page = _submit(browser, url, form, {})
        elif step == "code":
            if not user_code:
                raise ApproveError("the page asks for the user code; pass user_code")
            url, page = _submit(browser, url, form, {"user_code": user_code})
        elif step == "confirm":
            # Deny at the consent page, as a person reading it would.
            url, page = _submit(browser, url, form, {})
        elif step == "login":
            url, page = _submit(browser, url, form, {"login": login, "password": "any"})
        elif step == "consent":
            decision = ("decision", "deny" if deny else "allow")
            url, page = _submit(browser, url, form, {}, button=decision)
        else:
            raise ApproveError("unexpected page (step %r) at %s" % (step, url))
    raise ApproveError("too many steps; last page %s (step %r)" % (url, page.step))


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="approve.py",
        description="Approve or deny a device login on the local StandCloud (interop/server.js).",
    )
    parser.add_argument("uri", help="verification_uri_complete (or verification_uri with --user-code)")
    parser.add_argument("--user-code", help="the user code, when URI has none in it")
    parser.add_argument("--deny", action="store_true", help="deny instead of allow")
    parser.add_argument("--login", default="operator", help="the account to sign in as (default: operator)")
    args = parser.parse_args(argv)
    try:
        result = approve(args.uri, args.user_code, deny=args.deny, login=args.login)
    except (ApproveError, OSError) as e:
        sys.stderr.write("approve.py: error: %s\n" % e)
        return 1
    sys.stderr.write("approve.py: %s\n" % ("access denied" if result == "denied" else "approved; the station is signed in"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
