"""make doctor's report: what ansible/doctor.yml read on each participant's host, compared, participant by participant.

    python -m ops.doctor FACTS_DIR --project provision/project.yml [--jobs-dir DIR] [--site SITE] [--json FILE]

FACTS_DIR/hosts/<participant>.json: each host's facts (custom/ops/doctor_probe.py, with
this controller's clock before and after the probe; {"unreachable": true} for a host Ansible could not reach).
FACTS_DIR/check-data/<site>/<job>.json: each job's data check summary (the one `make check-data` runs).
--jobs-dir: the built jobs (<job>/meta.json) whose resource_spec and privacy scope each site must satisfy.

Every participant of project.yml (the server and the clients; --site: that one) gets one row per check with ok,
warning or error and what was found. A table goes to stdout, the whole report to --json; exit status 1 when any
check is an error (an unreachable or unprobed participant is one; the others are still reported).
"""

import argparse
import datetime
import json
import sys
from collections import Counter
from pathlib import Path

import yaml

from ops import certs as certs_mod

PACKAGES = ("nvflare", "monai", "torch")
CLOCK_WARN_S, CLOCK_ERROR_S = 5.0, 60.0  # |skew| to the controller: a warning above 5 s, an error above 60 s
DISK_WARN_B, DISK_ERROR_B = 10 * 2**30, 1 * 2**30  # free bytes in the workspace: warning < 10 GiB, error < 1 GiB
OK, WARNING, ERROR = "ok", "warning", "error"


def row(check: str, status: str, detail: str) -> dict:
    return {"check": check, "status": status, "detail": detail}


def load_project(path: Path) -> dict:
    """{"server": {name, ports}, "clients": [names]} of project.yml; a ValueError names the file and field."""
    try:
        project = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the project: {err}") from None
    parts = project.get("participants") if isinstance(project, dict) else None
    if not isinstance(parts, list):
        raise ValueError(f"{path}: participants: not a list")
    servers = [p for p in parts if isinstance(p, dict) and p.get("type") == "server"]
    if len(servers) != 1:
        raise ValueError(f"{path}: participants: needs exactly one of type server, has {len(servers)}")
    server = servers[0]
    if not isinstance(server.get("fed_learn_port"), int):
        raise ValueError(f"{path}: participants[{server.get('name')}].fed_learn_port: not a port number")
    ports = sorted({server["fed_learn_port"], server.get("admin_port", server["fed_learn_port"])})
    clients = [p["name"] for p in parts if isinstance(p, dict) and p.get("type") == "client"]
    return {"server": {"name": server["name"], "ports": ports}, "clients": clients}


def load_jobs(jobs_dir: Path | None) -> dict:
    """{job: meta.json} of the built jobs under JOBS_DIR (each <job>/meta.json)."""
    jobs = {}
    if jobs_dir:
        for meta in sorted(Path(jobs_dir).glob("*/meta.json")):
            try:
                jobs[meta.parent.name] = json.loads(meta.read_text())
            except ValueError as err:
                raise ValueError(f"{meta}: not valid JSON: {err}") from None
    return jobs


def load_facts(facts_dir: Path) -> dict:
    """{participant: facts} from FACTS_DIR/hosts/*.json; a file that is not JSON is a ValueError naming it."""
    facts = {}
    for path in sorted((Path(facts_dir) / "hosts").glob("*.json")):
        try:
            facts[path.stem] = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from None
    return facts


def failed(fact) -> str | None:
    """The error of a fact the probe could not read (None when it was read)."""
    if fact is None:
        return "not read"
    if isinstance(fact, dict) and set(fact) == {"error"}:
        return fact["error"]
    return None


def version_rows(probes: dict) -> dict:
    """{participant: row}: each participant's nvflare/monai/torch; a package whose version differs between the
    participants is an error on those that differ from the most common version (on all of them when none is)."""
    versions = {name: p["versions"] for name, p in probes.items() if not failed(p.get("versions"))}
    odd: dict[str, list[str]] = {name: [] for name in versions}
    for package in PACKAGES:
        values = {name: v.get(package) for name, v in versions.items()}
        counts = Counter(values.values())
        if len(counts) <= 1:
            continue
        (top, n), *rest = counts.most_common()
        majority = top if not rest or rest[0][1] < n else object()  # a tie: no majority
        spread = "; ".join(f"{v} on {', '.join(sorted(h for h, x in values.items() if x == v))}"
                           for v, _ in counts.most_common())  # fmt: skip
        for name, value in values.items():
            if value != majority:
                odd[name].append(f"{package} {value} differs from the other participants ({spread})")
    rows = {}
    for name, probe in probes.items():
        err = failed(probe.get("versions"))
        if err:
            rows[name] = row("versions", ERROR, f"cannot read the versions: {err}")
            continue
        v = versions[name]
        found = ", ".join(f"{p} {v.get(p)}" for p in PACKAGES) + f" ({v.get('source')})"
        rows[name] = row("versions", ERROR, "; ".join(odd[name]) + f" [{found}]") if odd[name] else row("versions", OK, found)
    return rows


def clock_row(facts: dict) -> dict:
    probe = facts["probe"]
    before, after, host = facts.get("controller_before"), facts.get("controller_after"), probe.get("time")
    if not all(isinstance(x, (int, float)) for x in (before, after, host)):
        return row("clock", ERROR, "cannot compare the host's clock with the controller's (time not read)")
    # The host read its clock after `before` and `elapsed` seconds before `after` (the probe's own work).
    elapsed = probe.get("elapsed")
    if isinstance(elapsed, (int, float)) and 0 <= elapsed <= after - before:
        after -= elapsed
    skew = 0.0 if before <= host <= after else (host - after if host > after else host - before)
    window = after - before
    detail = f"skew {skew:+.1f} s vs the controller (within a {window:.1f} s probe window)"
    status = ERROR if abs(skew) > CLOCK_ERROR_S else WARNING if abs(skew) > CLOCK_WARN_S else OK
    return row("clock", status, detail)


def cert_rows(probe: dict, now: datetime.datetime | None) -> list[dict]:
    err = failed(probe.get("certs"))
    if err:
        return [row("certificates", ERROR, f"cannot read the kit's certificates: {err}")]
    if not probe["certs"]:
        return [row("certificates", ERROR, "no certificate in the deployed kit's startup/")]
    rows = []
    for name, pem in sorted(probe["certs"].items()):
        try:
            info = certs_mod.describe(pem.encode(), f"startup/{name}", now)
        except ValueError as err:
            rows.append(row(f"cert {name}", ERROR, str(err)))
            continue
        status = {"ok": OK, "warning": WARNING}.get(info["status"], ERROR)
        detail = f"{info['subject']}: {info['status']}, {info['days_left']} days left (not after {info['not_after'][:10]})"
        rows.append(row(f"cert {name}", status, detail))
    return rows


def gpu_row(name: str, probe: dict, jobs: dict) -> dict:
    err = failed(probe.get("gpus"))
    if err:
        return row("gpus", ERROR, f"cannot read the GPUs: {err}")
    gpus = probe["gpus"]
    present, ids, offered = gpus.get("present", []), gpus.get("gpu_ids", []), gpus.get("offered")
    problems = []
    missing = sorted(set(ids) - set(present))
    if missing:
        problems.append(f"gpu_ids {missing} of local/site_config.json not on the host (it has {present or 'no GPU'})")
    if isinstance(offered, int) and offered > len(present):
        problems.append(f"local/resources.json offers {offered} GPUs, the host has {len(present)}")
    for job, meta in sorted(jobs.items()):
        need = ((meta.get("resource_spec") or {}).get(name) or {}).get("num_of_gpus", 0)
        if need and (offered or 0) < need:
            problems.append(f"job {job} asks {need} GPUs (meta.json resource_spec), the site offers {offered or 0}")
    detail = f"present {present}, gpu_ids {ids}" + (f", offered {offered}" if offered is not None else "")
    return row("gpus", ERROR, "; ".join(problems) + f" [{detail}]") if problems else row("gpus", OK, detail)


def disk_row(probe: dict) -> dict:
    err = failed(probe.get("disk"))
    if err:
        return row("disk", ERROR, f"cannot read the free disk: {err}")
    free = probe["disk"]["free"]
    status = ERROR if free < DISK_ERROR_B else WARNING if free < DISK_WARN_B else OK
    return row("disk", status, f"{free / 2**30:.1f} GiB free in {probe['disk']['path']}")


def client_rows(name: str, probe: dict, ports: list, jobs: dict, summaries: dict) -> list[dict]:
    rows = []
    err = failed(probe.get("reach"))
    if err:
        rows.append(row("server ports", ERROR, f"cannot check: {err}"))
    else:
        reach = probe["reach"]
        for port in ports:
            r = reach["ports"].get(str(port))
            if r is None:
                rows.append(row(f"port {port}", ERROR, f"not checked from {name}"))
            elif r["ok"]:
                rows.append(row(f"port {port}", OK, f"{reach['server']}:{port} reachable from {name}"))
            else:
                rows.append(row(f"port {port}", ERROR, f"{reach['server']}:{port} not reachable from {name}: {r['error']}"))
    err = failed(probe.get("preflight"))
    if err:
        rows.append(row("preflight", ERROR, f"nvflare's preflight rule did not run: {err}"))
    elif probe["preflight"].get("problem") == "PASSED":
        rows.append(row("preflight", OK, "nvflare CheckServerAvailable: PASSED (mutual TLS with the kit)"))
    else:
        pre = probe["preflight"]
        rows.append(row("preflight", ERROR, f"nvflare CheckServerAvailable: {pre.get('problem')} ({pre.get('solution')})"))
    err = failed(probe.get("privacy"))
    if err:
        rows.append(row("privacy", ERROR, f"cannot read local/privacy.json: {err}"))
    else:
        scopes = [s for s in probe["privacy"].get("scopes", []) if s]
        wanted = {job: meta.get("scope") for job, meta in jobs.items() if meta.get("scope")}
        unknown = [f"job {job} selects scope {scope!r}" for job, scope in sorted(wanted.items()) if scope not in scopes]
        if not scopes:
            rows.append(row("privacy", ERROR, "local/privacy.json has no scope: NVFlare refuses every job"))
        elif unknown:
            rows.append(row("privacy", ERROR, f"{'; '.join(unknown)}, not a scope of local/privacy.json ({', '.join(scopes)})"))
        else:
            rows.append(row("privacy", OK, f"scopes {', '.join(scopes)}"))
    for job in sorted(set(jobs) | set(summaries)):
        summary = summaries.get(job)
        if summary is None:
            rows.append(row(f"data {job}", ERROR, "no data check summary (the check did not run on the host)"))
            continue
        splits = summary.get("splits") or {}
        counts = ", ".join(f"{s} {v.get('images', '?')} images" for s, v in splits.items())
        if summary.get("ok") is True:
            rows.append(row(f"data {job}", OK, counts or "ok"))
        else:
            errors = summary.get("errors") or []
            first = "; ".join(data_error(e) for e in errors[:3])
            more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
            rows.append(row(f"data {job}", ERROR, f"{len(errors)} problem(s): {first}{more}" + (f" [{counts}]" if counts else "")))
    return rows


def data_error(e) -> str:
    if not isinstance(e, dict):
        return str(e)
    where = ":".join(str(x) for x in (e.get("file"), e.get("row")) if x is not None)
    column = f" column {e['column']}" if e.get("column") else ""
    return f"{where}{column}: {e.get('error')}" if where else str(e.get("error"))


def read_summaries(facts_dir: Path, site: str) -> dict:
    out = {}
    for path in sorted((Path(facts_dir) / "check-data" / site).glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except ValueError as err:
            out[path.stem] = {"ok": False, "errors": [f"{path}: not valid JSON: {err}"]}
    return out


def report(facts_dir: Path, project: dict, jobs: dict, site: str | None = None,
           now: datetime.datetime | None = None) -> dict:  # fmt: skip
    """The report: {"ok", "errors", "warnings", "participants": {name: {"status", "checks": [rows], "versions"}}}."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    names = [project["server"]["name"], *project["clients"]]
    if site is not None:
        if site not in names:
            raise ValueError(f"unknown SITE {site!r} (participants of the project: {', '.join(names)})")
        names = [site]
    facts = load_facts(facts_dir)
    probes = {n: facts[n]["probe"] for n in names
              if n in facts and not facts[n].get("unreachable") and not failed(facts[n].get("probe"))
              and facts[n]["probe"].get("deployed")}  # fmt: skip
    versions = version_rows(probes)
    participants = {}
    for name in names:
        f = facts.get(name)
        if f is None:
            rows = [row("host", ERROR, "not probed: not in the inventory, or Ansible failed before reading it (see doctor's ansible.log)")]
        elif f.get("unreachable"):
            rows = [row("host", ERROR, f"unreachable: {str(f.get('msg', '')).strip()[:300]}")]
        elif failed(f.get("probe")):
            rows = [row("host", ERROR, f"probe failed: {failed(f.get('probe'))}")]
        elif not f["probe"].get("deployed"):
            rows = [row("host", ERROR, f"reachable, but not deployed (no flarectl.sh and startup/): make deploy SITE={name}")]
        else:
            probe = f["probe"]
            running = probe.get("running") or {}
            rows = [row("host", OK, f"reachable ({f.get('runtime', '?')} runtime)"),
                    row("running", OK if running.get("rc") == 0 else ERROR, str(running.get("status") or failed(running)))]  # fmt: skip
            rows.append(versions[name])
            rows.append(clock_row(f))
            rows += cert_rows(probe, now)
            rows.append(disk_row(probe))
            if name == project["server"]["name"]:
                rows.append(gpu_row(name, probe, {}))
            else:
                rows.append(gpu_row(name, probe, jobs))
                rows += client_rows(name, probe, project["server"]["ports"], jobs, read_summaries(facts_dir, name))
        statuses = {r["status"] for r in rows}
        entry = {"status": ERROR if ERROR in statuses else WARNING if WARNING in statuses else OK, "checks": rows}
        if name in probes and not failed(probes[name].get("versions")):
            entry["versions"] = {p: probes[name]["versions"].get(p) for p in PACKAGES}
        participants[name] = entry
    all_rows = [r for p in participants.values() for r in p["checks"]]
    errors = sum(r["status"] == ERROR for r in all_rows)
    warnings = sum(r["status"] == WARNING for r in all_rows)
    return {"generated": now.isoformat(), "ok": errors == 0, "errors": errors, "warnings": warnings,
            "participants": participants}  # fmt: skip


def table(rep: dict, width: int = 110) -> str:
    lines = [("participant", "check", "status", "detail")]
    for name, p in rep["participants"].items():
        for r in p["checks"]:
            detail = r["detail"] if len(r["detail"]) <= width else r["detail"][: width - 3] + "..."
            lines.append((name, r["check"], r["status"].upper() if r["status"] != OK else OK, detail))
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    out = ["  ".join([*(c.ljust(w) for c, w in zip(line[:3], widths)), line[3]]).rstrip() for line in lines]
    out.append(f"{rep['errors']} error(s), {rep['warnings']} warning(s)")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("facts_dir", type=Path)
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--jobs-dir", type=Path)
    parser.add_argument("--site")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        rep = report(args.facts_dir, load_project(args.project), load_jobs(args.jobs_dir), args.site or None)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(rep))
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1) + "\n")
        print(f"report: {args.json}")
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
