"""`fedmed poc up|submit|status|stop-site|start-site|down`: FLARE POC mode on this machine, in one workspace folder."""

from __future__ import annotations

import json
import os
import sys

DEFAULT_WORKSPACE = os.environ.get("FEDMED_POC_WORKSPACE", "fedmed_poc")


def register(subparsers) -> None:
    poc = subparsers.add_parser(
        "poc",
        help="run a FLARE POC (server + sites on this machine) and submit jobs to it",
        description=(
            "FLARE proof-of-concept mode on one machine. Everything (startup kits, logs, state, a HOME of "
            "its own so ~/.nvflare is never touched) lives in --workspace; the server and each site run in "
            "their own process group, recorded in <workspace>/fedmed_poc.json."
        ),
    )
    sub = poc.add_subparsers(dest="poc_command", metavar="SUBCOMMAND")

    def workspace(p):
        p.add_argument(
            "--workspace", "-w", default=DEFAULT_WORKSPACE, help="POC workspace folder (default: %(default)s; env FEDMED_POC_WORKSPACE)"
        )

    up = sub.add_parser(
        "up",
        help="prepare (first time) and start the server and sites",
        description="Provision a POC for the sites, install the site privacy policy, start server and sites, wait until every site has registered.",
    )
    workspace(up)
    up.add_argument(
        "--sites", default=None, help="comma-separated site names (default: the workspace's sites; site-1,site-2 for a new one)"
    )
    up.add_argument("--num-sites", "-n", type=int, default=None, help="site-1..site-N instead of --sites")
    up.add_argument("--data", default=None, help="site data root (<data>/<site>/train.jsonl), given to the sites as FEDMED_DATA")
    up.add_argument("--privacy", default=None, help="privacy.json to install at every participant (default: poc_setup/privacy.json)")
    up.add_argument("--no-privacy", action="store_true", help="install no privacy policy")
    up.add_argument("--force", action="store_true", help="re-provision even if the workspace exists (stops a running POC first)")
    up.add_argument("--timeout", type=float, default=120, help="seconds to wait for the server and sites to come up")
    up.set_defaults(func=_up)

    submit = sub.add_parser(
        "submit",
        help="submit a job folder, wait for it and download the result",
        description="Submit a job folder (nvflare job submit as the project admin), wait for it, download its result into <workspace>/results/<job id> and print where the global adapter is.",
    )
    workspace(submit)
    submit.add_argument("job_folder")
    submit.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the job")
    submit.add_argument("--no-wait", action="store_true", help="only submit; print the job id")
    submit.add_argument("--out", default=None, help="download folder (default: <workspace>/results)")
    submit.set_defaults(func=_submit)

    status = sub.add_parser("status", help="processes, ports, jobs and the server's view")
    workspace(status)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=_status)

    stop_site = sub.add_parser(
        "stop-site",
        help="stop one participant (fault drills: a hospital goes down)",
        description="Stop one site (or the server) of the running POC with its job processes. A running job carries on without it until its train timeout; see docs/faults.md.",
    )
    workspace(stop_site)
    stop_site.add_argument("name", help="site name (or the server's name)")
    stop_site.add_argument(
        "--kill", action="store_true", help="SIGKILL at once, as a crash (default: SIGTERM, then SIGKILL after a grace period)"
    )
    stop_site.set_defaults(func=_stop_site)

    start_site = sub.add_parser(
        "start-site",
        help="start one participant again from its startup kit",
        description="Start a stopped site (or the server) from its startup kit and wait until it has registered. A site that comes back takes part from the next job (FLARE does not redeploy a running job to it); a job resubmitted with the same absolute --output-dir resumes after the last persisted round.",
    )
    workspace(start_site)
    start_site.add_argument("name", help="site name (or the server's name)")
    start_site.add_argument("--timeout", type=float, default=120, help="seconds to wait for it to come up")
    start_site.set_defaults(func=_start_site)

    down = sub.add_parser(
        "down",
        help="stop every process of the POC",
        description="Stop the server, the sites and their job processes (recorded process groups, then anything naming the workspace).",
    )
    workspace(down)
    down.add_argument("--clean", action="store_true", help="also delete the workspace folder")
    down.set_defaults(func=_down)


def _fail(exc) -> int:
    print(f"fedmed poc: error: {exc}", file=sys.stderr)
    return 1


def _up(args) -> int:
    from fedmed_components.flare import poc

    if args.sites:
        sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    elif args.num_sites:
        sites = [f"site-{i + 1}" for i in range(args.num_sites)]
    else:
        sites = None
    privacy = None if args.no_privacy else (args.privacy or poc.DEFAULT_PRIVACY)
    try:
        poc.prepare(args.workspace, sites, privacy=privacy, data=args.data, force=args.force)
        state = poc.start(args.workspace, timeout=args.timeout)
    except poc.PocError as exc:
        return _fail(exc)
    print(f"POC up in {poc.PocWorkspace.at(args.workspace).root}: server + {', '.join(state['sites'])}")
    print(f"admin startup kit: {state['admin_kit']} (user {state['admin']})")
    return 0


def _submit(args) -> int:
    from fedmed_components.flare import poc
    from fedmed_components.flare.job_check import check_job_folder

    check_job_folder(args.job_folder)  # a bad config fails here, not in the server's log
    try:
        job_id = poc.submit(args.workspace, args.job_folder)
        print(f"submitted job {job_id}")
        if args.no_wait:
            return 0
        meta = poc.wait(args.workspace, job_id, timeout=args.timeout)
        folder = poc.download(args.workspace, job_id, args.out)
    except poc.PocError as exc:
        return _fail(exc)
    print(f"job {job_id}: {meta.get('status')} in {meta.get('duration_s', '?')} s; result in {folder}")
    adapter = poc.adapter_folder(args.job_folder, folder)
    print(f"global adapter: {adapter}" if adapter else "no global adapter folder found in the job's output")
    return 0


def _status(args) -> int:
    from fedmed_components.flare import poc

    try:
        report = poc.status(args.workspace)
    except poc.PocError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"workspace {report['workspace']}; sites: {', '.join(report['sites'])}")
    for name, proc in report["processes"].items():
        print(f"  {name:<20} pid {proc['pid']:<8} {'running' if proc['alive'] else 'not running'}  log {proc['log']}")
    if not report["processes"]:
        print("  not running")
    if report.get("server"):
        clients = ", ".join(c["client_name"] for c in report["server"].get("clients", []))
        print(f"server sees: {clients or 'no sites'}; running jobs: {len(report['server'].get('jobs', []))}")
    for job in report["jobs"]:
        print(f"  job {job['id']}  {job['folder']}")
    return 0


def _down(args) -> int:
    from fedmed_components.flare import poc

    try:
        stopped = poc.down(args.workspace, clean=args.clean)
    except poc.PocError as exc:
        return _fail(exc)
    print(f"stopped {len(stopped)} process(es)" + ("; workspace removed" if args.clean else ""))
    return 0


def _stop_site(args) -> int:
    from fedmed_components.flare import poc

    try:
        stopped = poc.stop_participant(args.workspace, args.name, kill=args.kill)
    except poc.PocError as exc:
        return _fail(exc)
    print(f"{args.name}: stopped {len(stopped)} process(es)" + (" (killed)" if args.kill else ""))
    return 0


def _start_site(args) -> int:
    from fedmed_components.flare import poc

    try:
        record = poc.start_participant(args.workspace, args.name, timeout=args.timeout)
    except poc.PocError as exc:
        return _fail(exc)
    print(f"{args.name}: running again (pid {record['pid']}, log {record['log']})")
    return 0
