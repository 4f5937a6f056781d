"""System-administration samples for ``xoron synth``: diagnose or configure a server with shell commands.

The assistant runs commands in the seed's execution tokens and reads their output::

    <|exec|><|code|>sudo nginx -t<|/code|><|/exec|>
    <|exec_error|>nginx: [emerg] unknown directive "servername" in /etc/nginx/sites-enabled/shop:4 ...<|/exec_error|>

(``<|exec_result|>`` for a command that succeeded), and files it writes in ``<|filename|>path<|/filename|>``
+ ``<|code|>content<|/code|>``. Scenarios, each with outputs made consistent by construction:

    nginx    a config attached as a document with a misspelt directive; nginx -t names its line
    docker   a port already allocated; docker ps shows which container publishes it
    disk     a full root file system; df (size, used, available, use%) and du (sorted) find the largest folder
    cron     a schedule in words -> a crontab line (after crontab -l)
    systemd  a service in words -> a unit file (parsed by configparser), enabled and active
    logs     an access log attached; awk | sort | uniq -c gives the busiest client, grep -c the 5xx count
    packages a missing command installed with apt (apt update first when the index is stale), its --version

``check_sysadmin`` re-derives each scenario's facts from the sample's own text (the config's line, the
port, the sizes, the cron fields, the unit's keys, the log's counts) and compares them with the answer.
"""

from __future__ import annotations

import configparser
import math
import random
import re
from collections import Counter
from collections.abc import Callable

SITES = ("shop", "blog", "api", "wiki", "status", "docs", "grafana", "intranet")
APPS = ("ledger", "mailer", "thumbnailer", "scheduler", "webhooks", "exporter", "indexer", "tracker")
USERS = ("deploy", "www-data", "svc", "app", "runner")
IMAGES = ("nginx:1.27", "httpd:2.4", "grafana/grafana:11.1.0", "redis:7", "postgres:16", "traefik:v3.1")
TYPOS = (("server_name", "servername"), ("listen", "listn"), ("root", "roots"), ("index", "index_file"),
         ("proxy_pass", "proxy_pas"), ("access_log", "acces_log"))
NGINX_OK = ("nginx: the configuration file /etc/nginx/nginx.conf syntax is ok\n"
            "nginx: configuration file /etc/nginx/nginx.conf test is successful")


def _run(command: str, output: str, failed: bool = False) -> str:
    tag = "exec_error" if failed else "exec_result"
    return f"<|exec|><|code|>{command}<|/code|><|/exec|>\n<|{tag}|>{output}<|/{tag}|>"


def _doc(path: str, body: str) -> str:
    return f"<|filename|>{path}<|/filename|>\n<|doc|>\n{body}\n<|/doc|>"


def _sample(user: str, answer: str, scenario: str) -> dict:
    return {"turns": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "category": f"sysadmin:{scenario}"}


def nginx(rng: random.Random) -> dict:
    site, port = rng.choice(SITES), rng.choice((80, 8080, 8000, 443))
    domain = f"{site}.{rng.choice(('example.com', 'corp.internal', 'test.org'))}"
    upstream = f"http://127.0.0.1:{rng.randint(3000, 9999)}"
    lines = ["server {", f"    listen {port};", f"    server_name {domain};", f"    root /var/www/{site};",
             "    index index.html;", f"    access_log /var/log/nginx/{site}.access.log;",
             "    location /api/ {", f"        proxy_pass {upstream};", "    }", "}"]
    right, wrong = rng.choice(TYPOS)
    number = next(i for i, line in enumerate(lines) if line.strip().startswith(right + " "))
    broken = list(lines)
    broken[number] = broken[number].replace(right, wrong, 1)
    path = f"/etc/nginx/sites-enabled/{site}"
    user = (f"{rng.choice(('nginx will not reload after I edited', 'Reloading nginx fails since I changed'))} "
            f"{path}:\n{_doc(path, chr(10).join(broken))}")
    error = (f'nginx: [emerg] unknown directive "{wrong}" in {path}:{number + 1}\n'
             "nginx: configuration file /etc/nginx/nginx.conf test failed")
    answer = "\n".join([_run("sudo nginx -t", error, failed=True),
                        f"Line {number + 1} misspells `{right}` as `{wrong}`. Change it to:",
                        f"<|code|>{lines[number].strip()}<|/code|>", "Then test the configuration again:",
                        _run("sudo nginx -t", NGINX_OK), "It passes; apply it with `sudo systemctl reload nginx`."])
    return _sample(user, answer, "nginx")


def docker(rng: random.Random) -> dict:
    name, image = rng.choice(APPS), rng.choice(IMAGES)
    ports = rng.sample(range(3000, 9100), rng.randint(2, 5))
    port, holder = ports[0], f"{rng.choice(APPS)}-{rng.randint(1, 9)}"
    others = [f"{rng.choice(APPS)}-{10 + i}\t0.0.0.0:{p}->{rng.choice((80, 8080, 5432, 6379))}/tcp"
              for i, p in enumerate(ports[1:])]
    listing = [f"{holder}\t0.0.0.0:{port}->80/tcp", *others]
    rng.shuffle(listing)
    free = next(p for p in range(port + 1, port + 100) if p not in ports)
    command = f"docker run -d -p {port}:80 --name {name} {image}"
    error = (f"docker: Error response from daemon: driver failed programming external connectivity on endpoint "
             f"{name}: Bind for 0.0.0.0:{port} failed: port is already allocated.")
    answer = "\n".join([_run(command, error, failed=True), "Something already publishes that port. Which container:",
                        _run("docker ps --format '{{.Names}}\\t{{.Ports}}'", "\n".join(listing)),
                        f"`{holder}` publishes host port {port}. Stop it with `docker stop {holder}`, or publish "
                        f"your container on a free port instead: `-p {free}:80`."])
    return _sample(f"`{command}` fails. What is wrong?", answer, "docker")


def _size(megabytes: int) -> str:
    return f"{megabytes / 1024:.1f}G" if megabytes >= 1024 else f"{megabytes}M"


def disk(rng: random.Random) -> dict:
    size = rng.choice((20, 40, 50, 80, 100, 200))
    used = size - rng.choice((0, 1))
    folders = rng.sample(("log", "lib", "cache", "backups", "tmp", "www", "mail", "spool"), 4)
    megabytes = sorted(rng.sample(range(40, used * 1024 // 2), 4))
    du = "\n".join(f"{_size(mb)}\t/var/{folder}" for mb, folder in zip(megabytes, folders, strict=True))
    percent = math.ceil(100 * used / size)
    df = f"Filesystem      Size  Used Avail Use% Mounted on\n/dev/sda1        {size}G   {used}G    {size - used}G " \
         f"{percent:>3}% /"
    answer = "\n".join([_run("df -h /", df), f"The root file system is {percent}% full. What takes the space:",
                        _run("sudo du -sh /var/* 2>/dev/null | sort -h | tail -n 4", du),
                        f"/var/{folders[-1]} is the largest ({_size(megabytes[-1])}). Look there first: remove "
                        "what is no longer needed, or rotate and compress it."])
    user = rng.choice(("Writes fail with 'No space left on device'.", "The server says the disk is full.",
                       "My deploy failed: no space left on device."))
    return _sample(user, answer, "disk")


DAYS = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")


def cron(rng: random.Random) -> dict:
    script = f"/opt/{rng.choice(APPS)}/{rng.choice(('backup', 'sync', 'report', 'cleanup', 'rotate'))}.sh"
    minute, hour = rng.randint(0, 59), rng.randint(0, 23)
    form = rng.randrange(4)
    if form == 0:
        every = rng.choice((5, 10, 15, 20, 30))
        request, line = f"every {every} minutes", f"*/{every} * * * * {script}"
    elif form == 1:
        request, line = f"at {hour:02d}:{minute:02d} every weekday", f"{minute} {hour} * * 1-5 {script}"
    elif form == 2:
        day = rng.randint(1, 28)
        request, line = f"at {hour:02d}:{minute:02d} on day {day} of every month", f"{minute} {hour} {day} * * {script}"
    else:
        weekday = rng.randrange(7)
        request, line = f"at {hour:02d}:{minute:02d} every {DAYS[weekday]}", f"{minute} {hour} * * {weekday} {script}"
    existing = rng.choice(("", f"0 3 * * * /opt/{rng.choice(APPS)}/backup.sh"))
    listing = _run("crontab -l", existing) if existing else _run("crontab -l", f"no crontab for {rng.choice(USERS)}",
                                                                 failed=True)
    answer = "\n".join([listing, "Add this line with `crontab -e`:", f"<|code|>{line}<|/code|>",
                        "The fields are minute, hour, day of month, month and day of week."])
    return _sample(f"Run {script} {request}.", answer, "cron")


def systemd(rng: random.Random) -> dict:
    app, account = rng.choice(APPS), rng.choice(USERS)
    port = rng.randint(3000, 9999)
    command = f"/usr/bin/python3 /opt/{app}/server.py --port {port}"
    restart = rng.choice(("on-failure", "always"))
    unit = (f"[Unit]\nDescription={app.capitalize()} service\nAfter=network.target\n\n"
            f"[Service]\nUser={account}\nWorkingDirectory=/opt/{app}\nExecStart={command}\nRestart={restart}\n\n"
            "[Install]\nWantedBy=multi-user.target")
    path = f"/etc/systemd/system/{app}.service"
    restart_words = "whenever it fails" if restart == "on-failure" else "always, also after a clean exit"
    user = (f"Make `{command}` a systemd service named {app}: run it as {account} in /opt/{app}, restart it "
            f"{restart_words}, and start it at boot.")
    link = f"Created symlink /etc/systemd/system/multi-user.target.wants/{app}.service → {path}."
    answer = "\n".join([f"Write <|filename|>{path}<|/filename|>:", f"<|code|>{unit}<|/code|>",
                        _run(f"sudo systemctl daemon-reload && sudo systemctl enable --now {app}", link),
                        _run(f"systemctl is-active {app}", "active"), f"{app} is running and starts at boot."])
    return _sample(user, answer, "systemd")


def logs(rng: random.Random) -> dict:
    clients = [f"10.{rng.randint(0, 9)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}" for _ in range(4)]
    counts = rng.sample(range(1, 9), len(clients))  # distinct, so uniq -c | sort -rn has no ties
    paths = ("/", "/login", "/api/items", "/static/app.js", "/health", "/cart")
    lines = []
    for client, count in zip(clients, counts, strict=True):
        for _ in range(count):
            status = rng.choice((200, 200, 200, 301, 404, 500, 502, 503))
            lines.append(f'{client} - - [0{rng.randint(1, 9)}/Mar/2031:{rng.randint(10, 23)}:{rng.randint(10, 59)}'
                         f':{rng.randint(10, 59)} +0000] "GET {rng.choice(paths)} HTTP/1.1" {status} '
                         f'{rng.randint(100, 9000)}')
    rng.shuffle(lines)
    ranked = sorted(zip(counts, clients, strict=True), reverse=True)[:3]
    top = "\n".join(f"{count:>7} {client}" for count, client in ranked)
    errors = sum(1 for line in lines if re.search(r'" 5\d\d ', line))
    answer = "\n".join([_run("awk '{print $1}' access.log | sort | uniq -c | sort -rn | head -n 3", top),
                        _run("grep -cE '\" 5[0-9]{2} ' access.log", str(errors)),
                        f"{ranked[0][1]} sent the most requests ({ranked[0][0]}); {errors} requests got a 5xx."])
    user = ("Who sends the most requests, and how many server errors are there?\n"
            + _doc("access.log", "\n".join(lines)))
    return _sample(user, answer, "logs")


# (apt package, its command, how --version prints version v)
PACKAGES = (("jq", "jq", "jq-{v}"), ("ripgrep", "rg", "ripgrep {v}"), ("htop", "htop", "htop {v}"),
            ("tree", "tree", "tree v{v}"), ("shellcheck", "shellcheck", "ShellCheck - version: {v}"),
            ("fd-find", "fdfind", "fdfind {v}"), ("ncdu", "ncdu", "ncdu {v}"), ("tmux", "tmux", "tmux {v}"))


def packages(rng: random.Random) -> dict:
    """A missing command: apt finds its package (after an apt update when the index is stale)."""
    package, command, banner = rng.choice(PACKAGES)
    version = f"{rng.randint(1, 14)}.{rng.randint(0, 12)}.{rng.randint(0, 9)}"
    install = f"sudo apt install -y {package}"
    steps = [_run(f"{command} --version", f"bash: {command}: command not found", failed=True)]
    if rng.random() < 0.5:  # a stale package index
        steps += [_run(install, f"E: Unable to locate package {package}", failed=True),
                  "The package index is out of date; refresh it:",
                  _run("sudo apt update", f"Hit:1 http://archive.ubuntu.com/ubuntu noble InRelease\n"
                                          f"Reading package lists... Done\n{rng.randint(2, 90)} packages can be "
                                          "upgraded. Run 'apt list --upgradable' to see them.")]
    steps += [_run(install, f"Reading package lists... Done\nUnpacking {package} ({version}-1) ...\n"
                            f"Setting up {package} ({version}-1) ..."),
              _run(f"{command} --version", banner.format(v=version)),
              f"{package} {version} is installed; its command is `{command}`."]
    user = rng.choice(("`{c} --version` says command not found. Install it.", "I need {c} on this Ubuntu box.",
                       "How do I get the {c} command?")).format(c=command)
    return _sample(user, "\n".join(steps), "packages")


GENERATORS: tuple[Callable[[random.Random], dict], ...] = (nginx, docker, disk, cron, systemd, logs, packages)


# --------------------------------------------------------------------------- checking a sample

_RUN = re.compile(r"<\|exec\|><\|code\|>(.*?)<\|/code\|><\|/exec\|>\n"
                  r"<\|(exec_result|exec_error)\|>(.*?)<\|/\2\|>", re.S)
_ATTACHED = re.compile(r"<\|filename\|>(.+?)<\|/filename\|>\n<\|doc\|>\n(.*?)\n<\|/doc\|>", re.S)


def _runs(answer: str) -> list[tuple[str, bool, str]]:
    """(command, failed, output) of every command the assistant ran, in order."""
    return [(command, tag == "exec_error", output) for command, tag, output in _RUN.findall(answer)]


def _check_nginx(user: str, answer: str, runs: list) -> str | None:
    path, config = _ATTACHED.search(user).groups()
    found = re.search(r'unknown directive "(\S+)" in (\S+):(\d+)', runs[0][2])
    line = config.splitlines()[int(found.group(3)) - 1]
    if found.group(2) != path or line.split()[0] != found.group(1):
        return f"nginx -t points at line {found.group(3)} ({line!r}), which does not start with {found.group(1)}"
    fixed = re.search(r"<\|code\|>(.*?)<\|/code\|>\nThen", answer).group(1)
    right = [r for r, w in TYPOS if w == found.group(1)]
    if not right or fixed != line.strip().replace(found.group(1), right[0], 1):
        return f"the fix {fixed!r} is not line {found.group(3)} with the directive spelt right"
    return None if runs[-1] == ("sudo nginx -t", False, NGINX_OK) else "the config is not tested again"


def _check_docker(answer: str, runs: list) -> str | None:
    port = re.search(r"0\.0\.0\.0:(\d+) failed", runs[0][2]).group(1)
    holders = [line.split("\t")[0] for line in runs[1][2].splitlines() if f"0.0.0.0:{port}->" in line]
    named = re.search(r"`(\S+)` publishes host port (\d+)\. .*`-p (\d+):80`", answer)
    if len(holders) != 1 or named is None or (named.group(1), named.group(2)) != (holders[0], port):
        return f"port {port} is published by {holders}, the answer says {named and named.groups()}"
    used = set(re.findall(r"0\.0\.0\.0:(\d+)->", runs[1][2]))
    return f"the suggested port {named.group(3)} is taken" if named.group(3) in used else None


def _megabytes(size: str) -> float:
    return float(size[:-1]) * (1024 if size.endswith("G") else 1)


def _check_disk(answer: str, runs: list) -> str | None:
    size, used, avail, percent = re.search(r"(\d+)G +(\d+)G +(\d+)G +(\d+)% /$", runs[0][2]).groups()
    if int(size) - int(used) != int(avail) or math.ceil(100 * int(used) / int(size)) != int(percent):
        return f"df's numbers disagree: size {size}, used {used}, avail {avail}, use {percent}%"
    rows = [line.split("\t") for line in runs[1][2].splitlines()]
    sizes = [_megabytes(size) for size, _ in rows]
    largest = rows[-1][1]
    if sizes != sorted(sizes) or f"{largest} is the largest" not in answer or f"{percent}% full" not in answer:
        return "du's listing is not sorted, or the answer names another folder or use%"
    return None


def _check_cron(user: str, answer: str) -> str | None:
    written = re.search(r"`crontab -e`:\n<\|code\|>(.*?)<\|/code\|>", answer).group(1)
    minute, hour, day, month, weekday, script = written.split()
    request = re.fullmatch(r"Run (\S+) (.+)\.", user)
    if request is None or request.group(1) != script or month != "*":
        return "the crontab line runs another script"
    words = request.group(2)
    if (every := re.fullmatch(r"every (\d+) minutes", words)):
        expected = (f"*/{every.group(1)}", "*", "*", "*")
    else:
        at = re.match(r"at (\d\d):(\d\d) ", words)
        day_of_month = re.search(r"on day (\d+)", words)
        named_day = re.search(r"every (\w+day)$", words)
        dow = "1-5" if words.endswith("weekday") else str(DAYS.index(named_day.group(1))) if named_day else "*"
        expected = (str(int(at.group(2))), str(int(at.group(1))), day_of_month.group(1) if day_of_month else "*", dow)
    written_fields = (minute, hour, day, weekday)
    return None if written_fields == expected else f"'{words}' is {expected}, not {written_fields}"


def _check_systemd(user: str, answer: str, runs: list) -> str | None:
    unit = configparser.ConfigParser(interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string(re.search(r"<\|code\|>(.*?)<\|/code\|>", answer, re.S).group(1))
    want = re.fullmatch(r"Make `(.+)` a systemd service named (\S+): run it as (\S+) in (\S+), restart it (.+), and "
                        r"start it at boot\.", user)
    command, app, account, folder, when = want.groups()
    service = unit["Service"]
    restart = "on-failure" if when == "whenever it fails" else "always"
    got = (service.get("ExecStart"), service.get("User"), service.get("WorkingDirectory"), service.get("Restart"),
           unit.get("Install", "WantedBy", fallback=None))
    if got != (command, account, folder, restart, "multi-user.target"):
        return f"the unit file says {got}"
    return None if runs[-1] == (f"systemctl is-active {app}", False, "active") else "the service is not shown active"


def _check_logs(user: str, answer: str, runs: list) -> str | None:
    lines = _ATTACHED.search(user).group(2).splitlines()
    counts = Counter(line.split()[0] for line in lines)
    ranked = sorted(((n, client) for client, n in counts.items()), reverse=True)[:3]
    errors = sum(1 for line in lines if re.search(r'" 5\d\d ', line))
    if runs[0][2] != "\n".join(f"{n:>7} {client}" for n, client in ranked) or runs[1][2] != str(errors):
        return "the command outputs do not match the log"
    return None if answer.endswith(f"{ranked[0][1]} sent the most requests ({ranked[0][0]}); {errors} requests got "
                                   "a 5xx.") else "the answer does not match the outputs"


def _check_packages(answer: str, runs: list) -> str | None:
    package, version, command = re.search(r"^(\S+) (\S+) is installed; its command is `(\S+)`\.$", answer,
                                          re.M).groups()
    banner = next(b for p, c, b in PACKAGES if (p, c) == (package, command))
    installs = [i for i, (line, _, _) in enumerate(runs) if line.startswith("sudo apt install")]
    if runs[0] != (f"{command} --version", True, f"bash: {command}: command not found") or not installs:
        return "the command is not first shown missing, or nothing is installed"
    last = runs[installs[-1]]
    set_up = f"Setting up {package} ({version}-1)"
    if last[:2] != (f"sudo apt install -y {package}", False) or set_up not in last[2]:
        return f"the last install does not set up {package} {version}"
    if len(installs) == 2 and runs[installs[0] + 1][0] != "sudo apt update":
        return "a failed install is retried without apt update"
    return None if runs[-1] == (f"{command} --version", False, banner.format(v=version)) else "wrong version shown"


def check_sysadmin(sample: dict) -> str | None:
    """Why a sysadmin sample's outputs or answer disagree with its own facts, or None."""
    user, answer = sample["turns"][0]["content"], sample["turns"][-1]["content"]
    scenario = sample["category"].removeprefix("sysadmin:")
    runs = _runs(answer)
    if scenario != "cron" and not runs:
        return "no <|exec|> command with its <|exec_result|> or <|exec_error|>"
    try:
        checks = {"nginx": lambda: _check_nginx(user, answer, runs), "docker": lambda: _check_docker(answer, runs),
                  "disk": lambda: _check_disk(answer, runs), "cron": lambda: _check_cron(user, answer),
                  "systemd": lambda: _check_systemd(user, answer, runs),
                  "logs": lambda: _check_logs(user, answer, runs), "packages": lambda: _check_packages(answer, runs)}
        if scenario not in checks:
            return f"unknown sysadmin scenario '{scenario}'"
        return checks[scenario]()
    except (AttributeError, IndexError, ValueError, KeyError, StopIteration, configparser.Error) as err:
        return f"{scenario}: the sample does not have the scenario's structure ({type(err).__name__}: {err})"


__all__ = ["GENERATORS", "check_sysadmin", "cron", "disk", "docker", "logs", "nginx", "packages", "systemd"]
