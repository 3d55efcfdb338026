"""Certificates of the provisioned kits and their days to expiry (make certs; make doctor reads deployed ones).

    python -m ops.certs KIT_ROOT [--json FILE]     (custom/ on PYTHONPATH; KIT_ROOT: workspace/provision/<project>/prod_NN)

Lists the root CA (each kit's startup/rootCA.pem; one line per distinct root) and every participant's and admin's
certificate (startup/*.crt of each kit), with subject, role, NotAfter and the days left. Exit status 1 when a
certificate has expired (or a kit has none, or a file is not a certificate); a certificate with fewer than
WARN_DAYS days left is a warning. Only public certificates are read, never a key.
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

WARN_DAYS = 30  # fewer days left than this: a warning (renew before it is an error)


def _name(cert: x509.Certificate, oid) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if values else None


def describe(pem: bytes, where: str, now: datetime.datetime | None = None) -> dict:
    """One certificate's facts: subject CN, org, role (admins), NotAfter (ISO, UTC), days_left (whole days, negative
    once expired), issuer CN, and status ok / warning (< WARN_DAYS days left) / expired / not yet valid.
    WHERE names the file in errors (a file that holds no PEM certificate is a ValueError naming it)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as err:
        raise ValueError(f"{where}: not a PEM certificate ({err})") from None
    not_after, not_before = cert.not_valid_after_utc, cert.not_valid_before_utc
    seconds_left = (not_after - now).total_seconds()
    days_left = int(seconds_left // 86400)
    if seconds_left <= 0:
        status = "expired"
    elif not_before > now:
        status = "not yet valid"
    elif seconds_left < WARN_DAYS * 86400:
        status = "warning"
    else:
        status = "ok"
    basic = None
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        pass
    return {
        "file": where,
        "subject": _name(cert, NameOID.COMMON_NAME),
        "org": _name(cert, NameOID.ORGANIZATION_NAME),
        "role": _name(cert, NameOID.UNSTRUCTURED_NAME),
        "issuer": str(v[0].value) if (v := cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)) else None,
        "ca": bool(basic),
        "not_before": not_before.isoformat(),
        "not_after": not_after.isoformat(),
        "days_left": days_left,
        "status": status,
        "serial": format(cert.serial_number, "x"),
    }


def kit_certificates(kit_root: Path, now: datetime.datetime | None = None) -> list[dict]:
    """The root CA(s) and every kit's certificates under KIT_ROOT (one folder per participant, each with startup/),
    each as describe() gives it plus "participant". Raises ValueError naming the folder or file when KIT_ROOT has
    no kits, a kit has no certificate or a file is not one."""
    kit_root = Path(kit_root)
    kits = sorted(p for p in kit_root.iterdir() if (p / "startup").is_dir()) if kit_root.is_dir() else []
    if not kits:
        raise ValueError(f"{kit_root}: no startup kits (folders with startup/): run 'make provision' first")
    rows, roots = [], {}
    for kit in kits:
        startup = kit / "startup"
        crts = sorted(startup.glob("*.crt"))
        if not crts:
            raise ValueError(f"{startup}: no certificate (*.crt) in the kit of {kit.name}")
        for crt in crts:
            rows.append({"participant": kit.name, **describe(crt.read_bytes(), str(crt), now)})
        root = startup / "rootCA.pem"
        if not root.is_file():
            raise ValueError(f"{startup}: no rootCA.pem in the kit of {kit.name}")
        info = describe(root.read_bytes(), str(root), now)
        roots.setdefault(info["serial"], {"participant": "root CA", **info, "kits": []})["kits"].append(kit.name)
    return list(roots.values()) + rows


def worst(rows: list[dict]) -> str:
    """expired (or not yet valid) > warning > ok."""
    statuses = {r["status"] for r in rows}
    if statuses & {"expired", "not yet valid"}:
        return "error"
    return "warning" if "warning" in statuses else "ok"


def table(rows: list[dict]) -> str:
    header = ("participant", "file", "subject", "role", "not after (UTC)", "days left", "status")
    lines = [header] + [
        (r["participant"], Path(r["file"]).name, r["subject"] or "-", r["role"] or ("CA" if r["ca"] else "-"),
         r["not_after"][:19].replace("T", " "), str(r["days_left"]), r["status"])
        for r in rows
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kit_root", type=Path, help="a provisioned kit set: workspace/provision/<project>/prod_NN")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    try:
        rows = kit_certificates(args.kit_root)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"certificates of {args.kit_root}:")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    verdict = worst(rows)
    if verdict == "error":
        bad = [f"{r['participant']} {Path(r['file']).name} ({r['status']} {r['not_after'][:10]})" for r in rows
               if r["status"] in ("expired", "not yet valid")]  # fmt: skip
        print(f"error: certificate not valid now: {', '.join(bad)}", file=sys.stderr)
        return 1
    if verdict == "warning":
        soon = [f"{r['participant']} {Path(r['file']).name} ({r['days_left']} days)" for r in rows if r["status"] == "warning"]
        print(f"warning: fewer than {WARN_DAYS} days left: {', '.join(soon)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
