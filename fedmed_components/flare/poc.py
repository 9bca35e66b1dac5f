"""FLARE POC mode on one machine, owned by one workspace folder.

``fedmed poc up|submit|status|down`` drive the ``nvflare`` command line (run as
``sys.executable -m nvflare.cli``, stdin from /dev/null) and start the server and
sites themselves, each in its own process group, recorded in a state file. Nothing
here imports FLARE.

Everything lives under the workspace folder ``W``::

    W/fedmed_poc.json   state: ownership mark, sites, processes (pid, pgid, start time), jobs
    W/home/             HOME of every nvflare command and process: the user's
                        ~/.nvflare/config.conf is never read or written
    W/tmp/              TMPDIR of the FLARE processes
    W/nvflare_poc/      the POC workspace (NVFLARE_POC_WORKSPACE): startup kits of the
                        server, the sites and the admin users
    W/logs/<name>.log   console output of each participant
    W/results/<job id>/ downloaded job results

A workspace without the state file is never touched, and processes are only ever
stopped by their recorded pid (checked against their start time) or because their
command line names this workspace.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedmed_components.data.files import atomic_write_text
from fedmed_components.flare.processes import blas_thread_caps

POC_SETUP = Path(__file__).resolve().parent / "poc_setup"  # package data (the repository's poc_setup/ links here)
DEFAULT_PRIVACY = POC_SETUP / "privacy.json"
STATE_NAME = "fedmed_poc.json"
OWNER = "fedmed poc"
ALLOW_PREFIX = "fedmed_components."  # added to each participant's class_allow_list
DEFAULT_PORTS = (8002, 8003)
DONE_OK = "FINISHED:COMPLETED"


class PocError(RuntimeError):
    pass


@dataclass(frozen=True)
class PocWorkspace:
    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike) -> PocWorkspace:
        return cls(Path(root).expanduser().resolve())

    @property
    def state_file(self) -> Path:
        return self.root / STATE_NAME

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def poc_dir(self) -> Path:
        return self.root / "nvflare_poc"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def owned(self) -> bool:
        state = self.load()
        return bool(state) and state.get("owner") == OWNER

    def load(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def save(self, state: dict) -> None:
        atomic_write_text(self.state_file, json.dumps(state, indent=2, sort_keys=True))

    def require(self) -> dict:
        state = self.load()
        if not state or state.get("owner") != OWNER:
            raise PocError(f"{self.root} is not a workspace made by `fedmed poc up` (no {STATE_NAME}); not touching it")
        return state

    def env(self, extra: dict | None = None) -> dict:
        """Environment for nvflare commands and processes: own HOME, TMPDIR and POC dir."""
        env = dict(os.environ)
        env.update(
            HOME=str(self.home),
            TMPDIR=str(self.root / "tmp"),
            NVFLARE_POC_WORKSPACE=str(self.poc_dir),
            PYTHONUNBUFFERED="1",
            # built models stay in the user's cache rather than the temporary HOME
            FEDMED_CACHE=os.environ.get("FEDMED_CACHE") or str(Path.home() / ".cache" / "fedmed"),
        )
        env.update(extra or {})
        return env


# ------------------------------------------------------------------------ nvflare CLI
def nvflare(ws: PocWorkspace, *args: str, timeout: float = 120, env: dict | None = None):
    """Run ``nvflare --format json ARGS``; return the envelope's ``data`` or raise PocError."""
    cmd = [sys.executable, "-m", "nvflare.cli", "--format", "json", *args]
    try:
        proc = subprocess.run(
            cmd,
            env=env or ws.env(),
            cwd=ws.root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise PocError(f"`nvflare {' '.join(args)}` did not answer within {timeout:.0f} s") from None
    envelope = _last_json_object(proc.stdout)
    if proc.returncode != 0 or not envelope or envelope.get("status") != "ok":
        detail = (envelope or {}).get("message") or (proc.stderr or proc.stdout).strip()[-2000:]
        raise PocError(f"`nvflare {' '.join(args)}` failed (exit {proc.returncode}): {detail}")
    return envelope.get("data")


def _last_json_object(text: str) -> dict | None:
    for line in reversed((text or "").strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


# ------------------------------------------------------------------------- the layout
def project(ws: PocWorkspace) -> dict:
    """The provisioned project: server, sites, admins and their kit folders."""
    config = yaml.safe_load((ws.poc_dir / "project.yml").read_text())
    prod = ws.poc_dir / config["name"] / "prod_00"
    server = next(p for p in config["participants"] if p["type"] == "server")
    admins = [p for p in config["participants"] if p["type"] == "admin"]
    project_admin = next((a["name"] for a in admins if a.get("role") == "project_admin"), admins[0]["name"])
    return {
        "name": config["name"],
        "prod": prod,
        "server": server["name"],
        "sites": [p["name"] for p in config["participants"] if p["type"] == "client"],
        "admin": project_admin,
        "admin_kit": prod / project_admin,
    }


def server_ports(kit: Path) -> list[int]:
    """The ports the server will listen on, from its fed_server.json."""
    config = json.loads((kit / "startup" / "fed_server.json").read_text())
    ports = set()
    for server in config.get("servers", []):
        target = server.get("service", {}).get("target", "")
        if ":" in target:
            ports.add(int(target.rsplit(":", 1)[1]))
        if server.get("admin_port"):
            ports.add(int(server["admin_port"]))
    return sorted(ports) or list(DEFAULT_PORTS)


POC_LOCK = Path("/tmp/fedmed_poc.lock")


@contextlib.contextmanager
def exclusive_poc_lock(wait: float):
    """Hold the machine-wide POC lock (FLARE's POC ports are fixed), shared with anyone
    running `flock /tmp/fedmed_poc.lock ...`; TimeoutError after `wait` seconds."""
    import fcntl

    with open(POC_LOCK, "a") as handle:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{POC_LOCK} held by another POC user for over {wait:.0f} s") from None
                time.sleep(2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def busy_ports(ports) -> list[int]:
    """Ports another process listens on (a bind test, as the server will do)."""
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                busy.append(port)
    return busy


def kit_command(kit: Path) -> list[str]:
    """What the startup kit runs (the `exec python3 ...` line of startup/sub_start.sh),
    with this interpreter and without the kit's restart loop."""
    script = (kit / "startup" / "sub_start.sh").read_text()
    match = re.search(r"^\s*exec\s+python3?\s+(.+)$", script, re.MULTILINE)
    if not match:
        raise PocError(f"cannot find the start command in {kit / 'startup' / 'sub_start.sh'}")
    line = match.group(1).replace('"$WORKSPACE"', shlex.quote(str(kit))).replace("$WORKSPACE", shlex.quote(str(kit)))
    return [sys.executable, *shlex.split(line)]


def install_policy(kit: Path, privacy: Path | None) -> None:
    """local/privacy.json, and local/resources.json whose class_allow_list admits the
    FedMed components (FLARE's default list names only FLARE's own classes)."""
    local = kit / "local"
    if privacy is not None:
        shutil.copyfile(privacy, local / "privacy.json")
    else:
        (local / "privacy.json").unlink(missing_ok=True)
    source = local / "resources.json" if (local / "resources.json").exists() else local / "resources.json.default"
    if not source.exists():
        return
    resources = json.loads(source.read_text())
    allow = resources.get("class_allow_list")
    if isinstance(allow, list) and "*" not in allow and ALLOW_PREFIX not in allow:
        resources["class_allow_list"] = allow + [ALLOW_PREFIX]
    (local / "resources.json").write_text(json.dumps(resources, indent=2))


# ---------------------------------------------------------------------------- prepare
def prepare(
    root,
    sites: list[str] | None = None,
    *,
    privacy: str | os.PathLike | None = DEFAULT_PRIVACY,
    data: str | None = None,
    force: bool = False,
) -> dict:
    """Create (or reuse) the POC workspace for these sites (None: the workspace's own,
    or site-1, site-2 for a new one); install the site policy."""
    ws = PocWorkspace.at(root)
    if ws.root.exists() and any(ws.root.iterdir()) and not ws.owned():
        raise PocError(f"{ws.root} exists and was not made by `fedmed poc up`; choose an empty or new folder")
    state = ws.load()
    sites = list(sites) if sites else list((state or {}).get("sites") or ["site-1", "site-2"])
    if len(set(sites)) != len(sites) or not all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", s) for s in sites):
        raise PocError(f"need distinct site names (letters, digits, '-', '_', '.'), got {sites}")
    if privacy is not None and not Path(privacy).is_file():
        raise PocError(f"privacy policy {privacy} not found (pass --privacy FILE, or --no-privacy)")
    if state and state.get("sites") == sites and (ws.poc_dir / "project.yml").exists() and not force:
        fresh = False
    else:
        if state and any(running(ws).values()):
            if not force:
                raise PocError(f"the POC in {ws.root} is running with sites {state.get('sites')}; `fedmed poc down` first or use --force")
            stop(ws.root)
        for sub in (ws.poc_dir, ws.home):
            shutil.rmtree(sub, ignore_errors=True)
        fresh = True
    for sub in (ws.root, ws.home, ws.root / "tmp", ws.logs, ws.results):
        sub.mkdir(parents=True, exist_ok=True)
    state = {
        **(state or {}),
        "owner": OWNER,
        "sites": sites,
        "processes": (state or {}).get("processes", {}),
        "jobs": (state or {}).get("jobs", []),
    }
    ws.save(state)  # ownership first, so a failed prepare can be cleaned up by `down --clean`
    if fresh:
        nvflare(ws, "poc", "prepare", "-c", *sites, "--force", timeout=180)
    info = project(ws)
    privacy_path = Path(privacy).resolve() if privacy else None
    for name in [info["server"], *info["sites"]]:
        install_policy(info["prod"] / name, privacy_path)
    state.update(
        project=info["name"],
        server=info["server"],
        admin=info["admin"],
        admin_kit=str(info["admin_kit"]),
        privacy=str(privacy_path) if privacy_path else None,
        data=str(Path(data).resolve()) if data else state.get("data"),
        ports=server_ports(info["prod"] / info["server"]),
    )
    ws.save(state)
    return state


# ------------------------------------------------------------------------ processes
def _process(record: dict):
    """The live process a record names, or None (pid reused or gone)."""
    import psutil

    try:
        proc = psutil.Process(record["pid"])
        if abs(proc.create_time() - record["create_time"]) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
        return None


def running(ws: PocWorkspace) -> dict[str, bool]:
    state = ws.load() or {}
    return {name: _process(rec) is not None for name, rec in state.get("processes", {}).items()}


def start_kit(kit: Path, log: Path, env: dict) -> dict:
    """Start what a startup kit runs, in a process group of its own; the record to
    stop it by (pid, pgid, start time)."""
    import psutil

    cmd = kit_command(kit)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=kit, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return {"pid": proc.pid, "pgid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "cmd": cmd, "log": str(log)}


def stop_processes(records, marker: str | None = None, grace: float = 10.0) -> list[int]:
    """Stop recorded processes: their process groups, their trees and any process whose
    command line holds ``marker`` (see `processes.stop_process_trees`). Returns the pids."""
    from fedmed_components.flare.processes import stop_process_trees

    roots = []
    for rec in records:
        if _process(rec) is None:
            continue
        roots.append(rec["pid"])
        try:
            os.killpg(rec["pgid"], signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    return stop_process_trees(roots, marker=marker, grace=grace)


def _wait_port(port: int, deadline: float, alive) -> None:
    while time.monotonic() < deadline:
        if not alive():
            raise PocError("the server exited during start-up")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise PocError(f"the server did not open port {port} in time")


def start(root, *, timeout: float = 90) -> dict:
    """Start the server and every site (each in its own process group) and wait until
    every site has registered with the server. A POC already fully running is left as is."""
    ws = PocWorkspace.at(root)
    state = ws.require()
    alive = running(ws)
    wanted = [state["server"], *state["sites"]]
    same_data = state.get("running_data") == state.get("data")
    if alive and all(alive.get(n) for n in wanted) and same_data:
        return state
    if any(alive.values()):
        stop(ws.root)  # a partial POC, or one started with other site data: start it cleanly
        state = ws.require()
    busy = busy_ports(state.get("ports") or DEFAULT_PORTS)
    if busy:
        raise PocError(
            f"port(s) {busy} are in use by another process: another FLARE server or POC is running "
            "(stop it, e.g. `fedmed poc down --workspace ...` or `nvflare poc stop`), then retry"
        )
    info = project(ws)
    extra = {"FEDMED_DATA": state["data"]} if state.get("data") else {}
    env = ws.env(extra)
    deadline = time.monotonic() + timeout
    state["processes"] = {}
    try:
        rec = start_kit(info["prod"] / info["server"], ws.logs / f"{info['server']}.log", env)
        state["processes"][info["server"]] = rec
        ws.save(state)
        for port in state["ports"]:
            _wait_port(port, deadline, lambda: _process(rec) is not None)
        site_env = {**env, **blas_thread_caps(len(info["sites"]))}  # the sites train at once on this machine
        for site in info["sites"]:
            state["processes"][site] = start_kit(info["prod"] / site, ws.logs / f"{site}.log", site_env)
            ws.save(state)
        _wait_for_sites(ws, state, info["sites"], deadline)
    except BaseException:
        stop(ws.root)
        raise
    state["started"] = time.time()
    state["running_data"] = state.get("data")
    ws.save(state)
    return state


def _wait_for_sites(ws: PocWorkspace, state: dict, sites: list[str], deadline: float) -> None:
    missing = set(sites)
    while time.monotonic() < deadline:
        dead = [n for n, rec in state["processes"].items() if _process(rec) is None]
        if dead:
            raise PocError(f"{dead} exited during start-up; see {ws.logs}")
        try:
            connected = {c["client_name"] for c in system_status(ws).get("clients", [])}
            missing = set(sites) - connected
            if not missing:
                return
        except PocError:
            pass
        time.sleep(1.0)
    raise PocError(f"site(s) {sorted(missing)} did not register with the server in time; see {ws.logs}")


def system_status(ws: PocWorkspace) -> dict:
    state = ws.require()
    return nvflare(ws, "system", "status", "--startup-kit", state["admin_kit"], timeout=60) or {}


def stop(root, *, grace: float = 10.0) -> list[int]:
    """Stop every process of this POC (see ``stop_processes``; the marker is this
    workspace's path, so only its own stragglers are caught)."""
    ws = PocWorkspace.at(root)
    state = ws.require()
    stopped = stop_processes(state.get("processes", {}).values(), marker=str(ws.root) + os.sep, grace=grace)
    state["processes"] = {}
    state.pop("started", None)
    state.pop("running_data", None)
    ws.save(state)
    return stopped


def _kit_processes(kit: Path) -> list:
    """Processes run from a startup kit: a command-line word is the kit folder or inside it
    (the site's job processes name it too), so site-1 never matches site-10."""
    import psutil

    kit = str(kit)
    me = psutil.Process()
    spared = {me.pid} | {p.pid for p in me.parents()}
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            words = proc.info["cmdline"] or []
            if proc.pid not in spared and any(w == kit or w.startswith(kit + os.sep) for w in words):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_participant(root, name: str, *, kill: bool = False, grace: float = 10.0) -> list[int]:
    """Stop one participant of the POC (a site or the server) with its job processes;
    ``kill``: SIGKILL at once, as a machine that goes down. Returns the pids stopped."""
    import psutil

    ws = PocWorkspace.at(root)
    state = ws.require()
    known = [state.get("server"), *state.get("sites", [])]
    if name not in known:
        raise PocError(f"{name!r} is not a participant of the POC in {ws.root} (known: {', '.join(known)})")
    kit = project(ws)["prod"] / name
    record = state.get("processes", {}).pop(name, None)
    victims = {p.pid: p for p in _kit_processes(kit)}
    root_proc = _process(record) if record else None
    if root_proc is not None:
        for p in [root_proc, *root_proc.children(recursive=True)]:
            victims[p.pid] = p
    if kill:
        for p in victims.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(victims.values()), timeout=grace)
    else:
        from fedmed_components.flare.processes import stop_process_trees

        stop_process_trees(list(victims), grace=grace)
    ws.save(state)
    return sorted(victims)


def start_participant(root, name: str, *, timeout: float = 90) -> dict:
    """Start one participant from its startup kit again (after a crash or
    `stop_participant`); waits until the server lists the site (for the server: until
    it lists every running site again)."""
    ws = PocWorkspace.at(root)
    state = ws.require()
    if name not in [state.get("server"), *state.get("sites", [])]:
        raise PocError(f"{name!r} is not a participant of the POC in {ws.root}")
    if _process(state.get("processes", {}).get(name) or {}) is not None:
        raise PocError(f"{name} is already running (pid {state['processes'][name]['pid']})")
    info = project(ws)
    env = ws.env({"FEDMED_DATA": state["data"]} if state.get("data") else {})
    if name != info["server"]:
        env.update(blas_thread_caps(len(info["sites"])))
    deadline = time.monotonic() + timeout
    record = start_kit(info["prod"] / name, ws.logs / f"{name}.log", env)
    state.setdefault("processes", {})[name] = record
    ws.save(state)
    if name == info["server"]:  # and the running sites, which reconnect by themselves
        for port in state["ports"]:
            _wait_port(port, deadline, lambda: _process(record) is not None)
        _wait_for_sites(ws, state, [s for s in info["sites"] if s in state["processes"]], deadline)
    else:
        _wait_for_sites(ws, state, [name], deadline)
    return record


def down(root, *, clean: bool = False) -> list[int]:
    """Stop the POC; with ``clean`` also delete the workspace (only one we made)."""
    ws = PocWorkspace.at(root)
    if not ws.root.exists():
        return []
    ws.require()
    stopped = stop(ws.root)
    if clean:
        shutil.rmtree(ws.root)
    return stopped


# ------------------------------------------------------------------------------- jobs
def submit(root, job_folder) -> str:
    ws = PocWorkspace.at(root)
    state = ws.require()
    if not all(running(ws).values()) or not state.get("processes"):
        raise PocError(f"the POC in {ws.root} is not running; `fedmed poc up` first")
    job_folder = Path(job_folder).resolve()
    if not (job_folder / "meta.json").exists():
        raise PocError(f"{job_folder} is not a FLARE job folder (no meta.json)")
    data = nvflare(ws, "job", "submit", "-j", str(job_folder), "--startup-kit", state["admin_kit"], timeout=180)
    job_id = data["job_id"]
    state = ws.require()
    state["jobs"] = state.get("jobs", []) + [{"id": job_id, "folder": str(job_folder), "submitted": time.time()}]
    ws.save(state)
    return job_id


def job_status(root, job_id: str) -> str | None:
    """The job's status as the server records it (e.g. FINISHED:COMPLETED), or None."""
    ws = PocWorkspace.at(root)
    try:
        meta = nvflare(ws, "job", "meta", job_id, "--startup-kit", ws.require()["admin_kit"], timeout=60) or {}
    except PocError:
        return None
    return meta.get("status") or meta.get("job_meta", {}).get("status")


def wait(root, job_id: str, *, timeout: float = 1800, poll: float = 2.0) -> dict:
    """Wait for the job; return its meta. A job that does not finish cleanly in time
    (or fails) is a PocError with its status and the tail of the server's job log.
    (A site that died during the job never reports its end: FLARE then waits up to
    NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT, 900 s by default, before the job is finished.)"""
    ws = PocWorkspace.at(root)
    state = ws.require()
    try:
        meta = nvflare(
            ws,
            "job",
            "wait",
            job_id,
            "--timeout",
            str(timeout),
            "--interval",
            str(poll),
            "--startup-kit",
            state["admin_kit"],
            timeout=timeout + 60,
        )
    except PocError as exc:
        status = job_status(ws.root, job_id)
        hint = (
            " (it may still be running: `nvflare job abort` it, or `fedmed poc down`)"
            if "TIMEOUT" in str(exc) or "did not" in str(exc)
            else ""
        )
        raise PocError(f"job {job_id} (status {status}): {exc}{hint}\n{job_log_tail(ws, job_id)}") from None
    status = (meta or {}).get("status") or (meta or {}).get("job_meta", {}).get("status")
    if status != DONE_OK:
        raise PocError(f"job {job_id} ended with status {status}\n{job_log_tail(ws, job_id)}")
    return meta


def download(root, job_id: str, dest: str | os.PathLike | None = None) -> Path:
    """Download the job's result (the server's job workspace) into ``dest``."""
    ws = PocWorkspace.at(root)
    state = ws.require()
    dest = Path(dest).resolve() if dest else ws.results
    dest.mkdir(parents=True, exist_ok=True)
    data = nvflare(ws, "job", "download", job_id, "-o", str(dest), "--force", "--startup-kit", state["admin_kit"], timeout=300)
    location = (data or {}).get("path") or (data or {}).get("location") or (data or {}).get("download_path")
    return Path(location) if location else dest


def adapter_folder(job_folder, downloaded: Path | None = None) -> Path | None:
    """Where the job's global adapter is: the persistor's absolute ``output_dir``, or the
    ``global/`` folder inside the downloaded job workspace for a relative one."""
    config = Path(job_folder) / "app" / "config" / "config_fed_server.json"
    output_dir = None
    for path in [config, *Path(job_folder).glob("app*/config/config_fed_server.json")]:
        if path.exists():
            for comp in json.loads(path.read_text()).get("components", []):
                if comp.get("id") == "persistor":
                    output_dir = comp.get("args", {}).get("output_dir")
            break
    if output_dir and Path(output_dir).is_absolute():
        folder = Path(output_dir) / "global"
        return folder if (folder / "adapter_config.json").exists() else None
    if downloaded:
        found = sorted(Path(downloaded).rglob("global/adapter_config.json"))
        return found[0].parent if found else None
    return None


def job_log_tail(ws: PocWorkspace, job_id: str, lines: int = 40) -> str:
    """The end of the server's log for a job: from its run folder while it runs, else
    from the downloaded job workspace."""
    state = ws.load() or {}
    logs = []
    try:
        logs.append(project(ws)["prod"] / state.get("server", "server") / job_id / "log.txt")
    except (OSError, KeyError, StopIteration, ValueError):
        pass
    if not any(p.exists() for p in logs):
        try:
            logs.append(download(ws.root, job_id) / "workspace" / "log.txt")
        except PocError:
            pass
    for log in logs:
        if log.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
            return f"server job log {log} (tail):\n{tail}"
    return ""


def status(root) -> dict:
    """What is known without changing anything: processes, ports, jobs, and the
    server's view when it is up."""
    ws = PocWorkspace.at(root)
    state = ws.require()
    procs = {
        name: {"pid": rec["pid"], "alive": _process(rec) is not None, "log": rec.get("log")}
        for name, rec in state.get("processes", {}).items()
    }
    report = {
        "workspace": str(ws.root),
        "sites": state.get("sites", []),
        "processes": procs,
        "ports_in_use": busy_ports(state.get("ports") or DEFAULT_PORTS),
        "jobs": state.get("jobs", []),
    }
    if procs and all(p["alive"] for p in procs.values()):
        try:
            report["server"] = system_status(ws)
        except PocError as exc:
            report["server_error"] = str(exc)
    return report


def run_job(root, job_folder, *, timeout: float = 1800, dest=None) -> dict:
    """Submit, wait, download: the job id, the download folder and the adapter folder."""
    job_id = submit(root, job_folder)
    meta = wait(root, job_id, timeout=timeout)
    folder = download(root, job_id, dest)
    return {"job_id": job_id, "meta": meta, "download": folder, "adapter": adapter_folder(job_folder, folder)}
