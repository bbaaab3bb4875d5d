#!/usr/bin/env python3
"""Measure what standcloud-auth claims, and print it as a table.

From the repository root (it runs ../standcloud_auth.py from its own folder,
and the fake server is fakeserver.py beside it):

    python tests/bench.py                  # this interpreter, all three parts
    python tests/bench.py --python python3.6 --only hot     # another interpreter
    python tests/bench.py --runs 30 --storm 50 --only storm   # hot, login or storm

1. The hot path (contract: Speed): `token` with a valid stored token against
   `python -c pass`, both run by a clean virtual environment of the same
   interpreter (global site-packages can hold .pth files that slow every
   start), alternating, median wall time and peak memory. Both forms:
   `python -m standcloud_auth token` (bytecode cached, as the installed
   `standcloud-auth` runs): at most 3 times the bare start; and
   `python standcloud_auth.py token` (a copied file, compiled on every
   start): at most 4 times; each at most 8 MiB more peak memory. Next to it,
   what an eager import of the network stack would cost. Then, in the same
   clean environment: `import standcloud_auth` imports neither argparse nor
   ssl, http.client or urllib.request, and `token` on a valid stored token
   imports none of the network stack.

   Peak memory comes from GNU time (``/usr/bin/time -f %M``, Linux). Where it
   is missing the memory column says so; on Debian and Ubuntu it is the
   package ``time`` (``apt-get install time``).
2. Login efficiency: a real `login` subprocess against the fake server, the
   person approving after a chosen delay: requests sent, slow_down answers,
   and the delay from approval to stored token, next to the interval.
3. A refresh storm: N processes run `token` at once on an expired access
   token: wall time, refresh requests that reached the server, failures.

Wall times are medians of alternating runs, but they still move with the
machine's load: measure on a quiet machine, and rerun when a figure looks off.
Exit 0 when every target is met, 1 when one is missed.

Standard library only; the fake server is fakeserver.py beside this file.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.join(os.path.dirname(HERE), "standcloud_auth.py")
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# contract: Speed. The wall-time ratio against a bare start, per form.
RATIO_TARGETS = {"python -m standcloud_auth token": 3.0, "python standcloud_auth.py token": 4.0}
MEMORY_TARGET_MIB = 8.0  # more peak memory than the bare start, each form
# What `import standcloud_auth` must not import; and `token` on the hot path
# none of the network stack (the last three).
LAZY_MODULES = ("argparse", "ssl", "http.client", "urllib.request")
NETWORK_MODULES = LAZY_MODULES[1:]

GNU_TIME = "/usr/bin/time"
NO_GNU_TIME = ("peak memory not measured: GNU time (%s) is missing; on Debian or Ubuntu install the package "
               "'time' (apt-get install time)" % GNU_TIME)


def gnu_time_usable():
    return sys.platform.startswith("linux") and os.access(GNU_TIME, os.X_OK)


def run_measured(argv, env, cwd):
    """Wall seconds and peak RSS in MiB (None where it cannot be measured).

    The peak comes from GNU time (``-f %M``) when it is there: a child's own
    ru_maxrss is useless, because Linux counts the forked parent's pages in
    it. time's own start adds the same ~1 ms to every command.
    """
    rss_file = os.path.join(cwd, "rss.txt")
    use_time = gnu_time_usable()
    command = [GNU_TIME, "-f", "%M", "-o", rss_file] + argv if use_time else argv
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.communicate()[1]
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit("bench: %s failed (%s): %s" % (" ".join(argv), proc.returncode, err.decode()[-300:]))
    if not use_time:
        return wall, None
    with open(rss_file) as handle:
        return wall, int(handle.read().split()[-1]) / 1024.0  # KiB


def make_venv(python, where):
    subprocess.check_call([python, "-m", "venv", "--without-pip", where])
    exe = os.path.join(where, "Scripts" if sys.platform == "win32" else "bin", "python")
    return exe + (".exe" if sys.platform == "win32" else "")


def bench_hot_path(python, runs, tmp):
    vpy = make_venv(python, os.path.join(tmp, "venv"))
    work = os.path.join(tmp, "work")
    os.mkdir(work)
    shutil.copy(MODULE, os.path.join(work, "standcloud_auth.py"))
    store = os.path.join(work, "tokens.json")
    now = time.time()
    entry = {"access_token": "bench-token", "refresh_token": "r", "token_type": "Bearer",
             "expires_at": now + 86400, "scope": None, "updated_at": now}
    with open(store, "w") as handle:
        json.dump({"version": 1, "servers": {"https://bench.example": entry}}, handle)
    os.chmod(store, 0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STANDCLOUD_", "PYTHON"))}
    env.update(STANDCLOUD_TOKEN_FILE=store, STANDCLOUD_URL="https://bench.example")
    forms = [
        ("python -c pass", [vpy, "-c", "pass"]),
        ("python -m standcloud_auth token", [vpy, "-m", "standcloud_auth", "token"]),
        ("python standcloud_auth.py token", [vpy, "standcloud_auth.py", "token"]),
        ("eager: import ssl, urllib.request, http.client", [vpy, "-c", "import ssl, urllib.request, http.client"]),
    ]
    for _, argv in forms:  # warm the disk cache and write the module's bytecode
        run_measured(argv, env, work)
    samples = {name: ([], []) for name, _ in forms}
    for _ in range(runs):
        for name, argv in forms:
            wall, peak = run_measured(argv, env, work)
            samples[name][0].append(wall)
            samples[name][1].append(peak)
    rows, ok = [], True
    base_wall = statistics.median(samples[forms[0][0]][0])
    base_mem = _median_or_none(samples[forms[0][0]][1])
    for name, _ in forms:
        wall = statistics.median(samples[name][0])
        mem = _median_or_none(samples[name][1])
        ratio = wall / base_wall
        extra = None if mem is None or base_mem is None else mem - base_mem
        target = ""
        if name in RATIO_TARGETS:
            met = ratio <= RATIO_TARGETS[name] and (extra is None or extra <= MEMORY_TARGET_MIB)
            ok = ok and met
            target = "<= %gx, <= +%g MiB: %s" % (RATIO_TARGETS[name], MEMORY_TARGET_MIB,
                                                 ("ok" if met else "MISSED") + ("" if extra is not None else " (wall only)"))
        rows.append((name, "%.1f ms" % (wall * 1000), "%.2f" % ratio,
                     "-" if mem is None else "%.1f MiB" % mem, "-" if extra is None else "%+.1f MiB" % extra, target))
    print_table("Hot path: %d alternating runs, medians, against a bare start of a clean venv" % runs,
                ("command", "wall", "x bare", "peak RSS", "vs bare", "target"), rows)
    if base_mem is None:
        print("\n" + NO_GNU_TIME)
    return check_imports(vpy, env, work) and ok


def check_imports(vpy, env, work):
    """contract: Speed. What a vendored import and the token hot path load,
    each in a fresh interpreter of the clean venv."""
    report = "import sys; sys.stderr.write(' '.join(m for m in %r if m in sys.modules))" % (LAZY_MODULES,)
    checks = [
        ("import standcloud_auth", "import standcloud_auth; " + report, LAZY_MODULES),
        ("token, valid stored token: main(['token'])",
         "import standcloud_auth; code = standcloud_auth.main(['token']); " + report + "; sys.exit(code)",
         NETWORK_MODULES),
    ]
    rows, ok = [], True
    for name, code, forbidden in checks:
        proc = subprocess.Popen([vpy, "-c", "import sys; " + code], env=env, cwd=work, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        err = proc.communicate()[1].decode("utf-8", "replace").strip()
        loaded = [m for m in err.split() if m in forbidden]
        met = proc.returncode == 0 and not loaded
        ok = ok and met
        rows.append((name, ", ".join(forbidden), ", ".join(loaded) or ("none" if proc.returncode == 0 else err[-200:]),
                     "ok" if met else "MISSED"))
    print_table("Lazy imports (contract: Speed)", ("what runs", "must not import", "imported", "result"), rows)
    return ok


def _median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def bench_login(interval, delay, tmp):
    from fakeserver import FakeStandCloud

    server = FakeStandCloud().start()
    server.interval = interval
    store = os.path.join(tmp, "login", "tokens.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STANDCLOUD_")}
    env["STANDCLOUD_TOKEN_FILE"] = store
    try:
        proc = subprocess.Popen([sys.executable, MODULE, "--url", server.base, "login", "--json", "--no-qr", "--no-check"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        first = json.loads(proc.stdout.readline().decode())
        approved = []

        def approve():
            approved.append(time.perf_counter())
            server.approve()

        timer = threading.Timer(delay, approve)
        timer.start()
        last = json.loads(proc.stdout.readline().decode())
        done = time.perf_counter()
        proc.wait(30)
        proc.stdout.close()
        timer.join()
    finally:
        server.stop()
    lag = done - approved[0]
    polls = server.polls()
    allowed = int(delay // interval) + 2  # one poll per interval, the first after one interval
    ok = last.get("event") == "logged_in" and server.slow_downs == 0 and lag <= interval * 1.1 + 0.5 and polls <= allowed
    rows = [
        ("interval (server)", "%g s" % first["interval"]),
        ("approval after", "%g s" % delay),
        ("device requests", "%d" % server.count("/auth/api/oidc/device-authorization")),
        ("token polls", "%d (limit %d: one per interval)" % (polls, allowed)),
        ("slow_down answers", "%d" % server.slow_downs),
        ("approval -> stored token", "%.2f s (limit: one interval + 10 %%, %.2f s)" % (lag, interval * 1.1)),
        ("result", "ok" if ok else "MISSED"),
    ]
    print_table("Login efficiency against the fake server", ("measure", "value"), rows)
    return ok


def bench_storm(processes, tmp):
    from fakeserver import FakeStandCloud

    server = FakeStandCloud().start()
    server.refresh_delay = 0.2  # widen the race: the refresh is slow, everyone piles up
    store = os.path.join(tmp, "storm", "tokens.json")
    os.makedirs(os.path.dirname(store))
    tokens = server.issue()
    now = time.time()
    entry = {"access_token": tokens["access_token"], "refresh_token": tokens["refresh_token"], "token_type": "Bearer",
             "expires_at": now - 1, "scope": None, "updated_at": now - 3600}
    fd = os.open(store, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"version": 1, "servers": {server.base: entry}}, handle)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STANDCLOUD_")}
    env.update(STANDCLOUD_TOKEN_FILE=store, STANDCLOUD_URL=server.base)
    try:
        started = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, MODULE, "token"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for _ in range(processes)]
        results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
        wall = time.perf_counter() - started
    finally:
        server.stop()
    failures = sum(1 for _, _, code in results if code != 0)
    printed = set(out.strip() for out, _, code in results if code == 0)
    ok = server.refreshes() == 1 and failures == 0 and len(printed) == 1
    rows = [
        ("processes", "%d" % processes),
        ("wall time", "%.2f s" % wall),
        ("refresh requests at the server", "%d (target 1)" % server.refreshes()),
        ("failures", "%d (target 0)" % failures),
        ("distinct tokens printed", "%d (target 1)" % len(printed)),
        ("result", "ok" if ok else "MISSED"),
    ]
    print_table("Refresh storm: %d processes at expiry" % processes, ("measure", "value"), rows)
    return ok


def print_table(title, header, rows):
    widths = [max(len(str(r[i])) for r in [header] + list(rows)) for i in range(len(header))]
    print("\n%s\n" % title)
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for the hot path: a path, or a name on PATH (default: this one)")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--storm", type=int, default=50, help="processes in the refresh storm")
    parser.add_argument("--interval", type=float, default=2.0, help="the fake server's poll interval")
    parser.add_argument("--delay", type=float, default=5.0, help="seconds before the person approves")
    parser.add_argument("--only", choices=("hot", "login", "storm"))
    args = parser.parse_args()
    python = shutil.which(args.python) if os.sep not in args.python else args.python  # python3.6 on PATH
    if not python or not os.path.exists(python):
        parser.error("--python: no interpreter %r" % args.python)
    python = os.path.abspath(python)
    version = subprocess.check_output([python, "-c", "import sys; print(sys.version.split()[0])"]).decode().strip()
    print("$ python tests/bench.py %s" % " ".join(sys.argv[1:]))
    print("machine: %s %s, %d CPUs; hot path on CPython %s (%s)"
          % (platform.system(), platform.machine(), os.cpu_count() or 0, version, python))
    tmp = tempfile.mkdtemp(prefix="standcloud-bench-")
    ok = True
    try:
        if args.only in (None, "hot"):
            ok = bench_hot_path(python, args.runs, tmp) and ok
        if args.only in (None, "login"):
            ok = bench_login(args.interval, args.delay, tmp) and ok
        if args.only in (None, "storm"):
            ok = bench_storm(args.storm, tmp) and ok
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nall targets met" if ok else "\nSOME TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
