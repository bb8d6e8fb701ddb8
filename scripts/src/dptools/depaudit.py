"""Dependency audit: the known vulnerabilities of every package version pinned in `uv.lock`.

    python -m dptools.depaudit                    # audit the repository's uv.lock; exit 1 on a finding
    python -m dptools.depaudit --json             # the report as JSON
    python -m dptools.depaudit --lock path/uv.lock --require-data   # exit 1 also when a pin is not audited

Every registry pin of the lock (all platforms and Python versions, not only this machine's) gets one
verdict from PyPI's vulnerability data (OSV: the PyPA advisory database and GitHub advisories):

1. the release document `/pypi/<name>/<version>/json`: its `vulnerabilities` are the pinned version's
   (what pip-audit's PyPI service reads). Where it answers, the pin is audited.
2. otherwise the project document `/pypi/<name>/json`: its `vulnerabilities` are those of the latest
   release (`info.version`) only. A pin that is the latest release is audited by it. For an older pin
   it says nothing that clears it: a vulnerability fixed between the pin and the latest release is not
   listed. A vulnerability listed there (the latest release is affected) may or may not reach back to
   the pin (the document carries no affected ranges, only `fixed_in`), so it is reported as a finding
   ("possibly affected") rather than waved through.

Verdicts: `vulnerable` and `possibly affected` are findings (exit status 1); `clean` means data for
that exact version listed nothing; `not audited` gives the reason (no data for that version, registry
unreachable, deadline passed). A pin is never reported clean without data for its own version.
Withdrawn advisories are ignored. Every request has a timeout and the whole audit a deadline.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeGuard

from dptools.pipeline import REPO

PYPI = "https://pypi.org/pypi"
RELEASE_SOURCE = "PyPI release document (/pypi/<name>/<version>/json)"
PROJECT_SOURCE = "PyPI project document (/pypi/<name>/json, latest release only)"

Verdict = Literal["vulnerable", "possibly affected", "clean", "not audited"]
FINDINGS: tuple[Verdict, ...] = ("vulnerable", "possibly affected")


@dataclass(frozen=True, slots=True)
class Pin:
    """One package version pinned in the lock."""

    name: str
    version: str


@dataclass(frozen=True, slots=True)
class Answer:
    """What one GET of a JSON document gave: the document, or `error` (with the HTTP `status`, 0: none)."""

    document: Mapping[str, Any] | None
    status: int = 0
    error: str = ""


@dataclass(frozen=True, slots=True)
class Vulnerability:
    """One advisory as PyPI lists it."""

    id: str
    aliases: tuple[str, ...] = ()
    fixed_in: tuple[str, ...] = ()
    link: str = ""


@dataclass(frozen=True, slots=True)
class PinReport:
    """The verdict on one pin, the source that gave it and why."""

    name: str
    version: str
    verdict: Verdict
    source: str
    reason: str = ""
    latest: str = ""
    vulnerabilities: tuple[Vulnerability, ...] = ()
    yanked: str = ""
    release_error: str = ""


@dataclass(frozen=True, slots=True)
class AuditReport:
    """The audit of a whole lock."""

    lock: str
    started: str
    seconds: float
    pins: tuple[PinReport, ...] = field(default_factory=tuple)

    @property
    def findings(self) -> list[PinReport]:
        """The pins found vulnerable or possibly affected."""
        return [p for p in self.pins if p.verdict in FINDINGS]

    @property
    def audited(self) -> list[PinReport]:
        """The pins decided from data for their own version (vulnerable or clean)."""
        return [p for p in self.pins if p.verdict in ("vulnerable", "clean")]

    @property
    def not_audited(self) -> list[PinReport]:
        """The pins without data for their version (possibly affected ones included)."""
        return [p for p in self.pins if p.verdict in ("not audited", "possibly affected")]


Fetch = Callable[[str], Answer]


def lock_pins(lock_text: str) -> list[Pin]:
    """The registry packages pinned in a uv.lock (workspace members and path sources left out)."""
    data = tomllib.loads(lock_text)
    pins = {Pin(p["name"], p["version"]) for p in data.get("package", [])
            if "registry" in p.get("source", {}) and "version" in p}
    return sorted(pins, key=lambda p: (p.name, p.version))


def _vulnerabilities(document: Mapping[str, Any]) -> tuple[Vulnerability, ...]:
    """The advisories a PyPI document lists, withdrawn ones left out."""
    out = []
    for v in document.get("vulnerabilities") or []:
        if v.get("withdrawn"):
            continue
        out.append(Vulnerability(id=str(v.get("id", "?")), aliases=tuple(v.get("aliases") or ()),
                                 fixed_in=tuple(v.get("fixed_in") or ()), link=str(v.get("link") or "")))
    return tuple(out)


def _yanked(files: Sequence[Mapping[str, Any]]) -> str:
    """`yanked: <reason>` when every file of a release is yanked, else ''."""
    if files and all(f.get("yanked") for f in files):
        return f"yanked: {files[0].get('yanked_reason') or 'no reason given'}"
    return ""


def _has_data(document: Mapping[str, Any] | None, version: str | None = None
              ) -> TypeGuard[Mapping[str, Any]]:
    """Whether a document carries a `vulnerabilities` list (for `version`, when given)."""
    if document is None or not isinstance(document.get("vulnerabilities"), list):
        return False
    return version is None or str(document.get("info", {}).get("version")) == version


def judge(pin: Pin, release: Answer, project: Answer | None) -> PinReport:
    """The verdict on one pin from its release document and, failing that, its project document (pure)."""
    doc = release.document
    if _has_data(doc, pin.version):
        vulns = _vulnerabilities(doc)
        return PinReport(pin.name, pin.version, "vulnerable" if vulns else "clean", RELEASE_SOURCE,
                         vulnerabilities=vulns, yanked=_yanked(doc.get("urls") or []))
    release_gap = release.error or "no data for this version"
    doc = project.document if project is not None else None
    if not _has_data(doc):
        why = (project.error or "no vulnerability data in it") if project is not None else "not fetched"
        return PinReport(pin.name, pin.version, "not audited", PROJECT_SOURCE, release_error=release_gap,
                         reason=f"no data: release document {release_gap}; project document {why}")
    latest = str(doc.get("info", {}).get("version", ""))
    vulns = _vulnerabilities(doc)
    releases = doc.get("releases") or {}
    yanked = _yanked(releases.get(pin.version) or [])
    if latest == pin.version:
        return PinReport(pin.name, pin.version, "vulnerable" if vulns else "clean", PROJECT_SOURCE,
                         latest=latest, vulnerabilities=vulns, yanked=yanked, release_error=release_gap)
    if vulns:
        return PinReport(pin.name, pin.version, "possibly affected", PROJECT_SOURCE, latest=latest,
                         vulnerabilities=vulns, yanked=yanked, release_error=release_gap,
                         reason=f"the latest release {latest} is affected; no data says whether "
                                f"{pin.version} is")
    listed = "" if pin.version in releases else "; the version is not among the project's releases"
    return PinReport(pin.name, pin.version, "not audited", PROJECT_SOURCE, latest=latest, yanked=yanked,
                     release_error=release_gap,
                     reason=f"behind the latest release {latest}, the only one the project document "
                            f"covers (release document {release_gap}){listed}")


def http_fetch(timeout_s: float = 10.0, deadline: float | None = None) -> Fetch:
    """A fetch of JSON documents over HTTPS: each GET times out, none starts past the deadline."""
    context = ssl.create_default_context()  # loaded once: a context per request costs ~40 ms of CPU

    def fetch(url: str) -> Answer:
        if deadline is not None and time.monotonic() > deadline:
            return Answer(None, error="not fetched: the audit's deadline passed")
        headers = {"Accept": "application/json", "User-Agent": "dptools-depaudit"}
        request = urllib.request.Request(url, headers=headers)  # noqa: S310 - https PyPI only
        try:
            with urllib.request.urlopen(  # noqa: S310 - https PyPI only
                    request, timeout=timeout_s, context=context) as resp:
                return Answer(json.loads(resp.read()), status=int(resp.status))
        except urllib.error.HTTPError as exc:
            return Answer(None, status=int(exc.code), error=f"HTTP {exc.code}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return Answer(None, error=f"unreachable ({type(exc).__name__}: {reason})")

    return fetch


def audit_pin(pin: Pin, fetch: Fetch, base: str = PYPI) -> PinReport:
    """Fetch what PyPI says about one pin and judge it (the project document only when needed)."""
    name = urllib.parse.quote(pin.name)
    release = fetch(f"{base}/{name}/{urllib.parse.quote(pin.version)}/json")
    project = None if _has_data(release.document, pin.version) else fetch(f"{base}/{name}/json")
    return judge(pin, release, project)


def audit(pins: Sequence[Pin], fetch: Fetch, lock: str = "", workers: int = 8,
          base: str = PYPI) -> AuditReport:
    """Audit every pin, `workers` at a time."""
    started = datetime.now(UTC)
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reports = tuple(pool.map(lambda p: audit_pin(p, fetch, base), pins))
    return AuditReport(lock=lock, started=started.isoformat(timespec="seconds"),
                       seconds=round(time.monotonic() - t0, 1), pins=reports)


def audit_lock(lock: Path, timeout_s: float = 10.0, deadline_s: float = 90.0, workers: int = 8,
               base: str = PYPI) -> AuditReport:
    """Audit a uv.lock against PyPI (each GET `timeout_s`, no GET started after `deadline_s`)."""
    fetch = http_fetch(timeout_s, time.monotonic() + deadline_s)
    return audit(lock_pins(lock.read_text(encoding="utf-8")), fetch, str(lock), workers, base)


def _ids(vulns: Iterable[Vulnerability]) -> str:
    return ", ".join(v.id + (f" (fixed in {', '.join(v.fixed_in)})" if v.fixed_in else " (no fix)")
                     for v in vulns)


def _counted(reasons: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for why in reasons:
        counts[why] = counts.get(why, 0) + 1
    return "; ".join(f"{n} {why}" for why, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def render(report: AuditReport) -> str:
    """The human report: the totals, what each source decided and why not, then findings and gaps."""
    pins = report.pins
    lines = [f"dependency audit of {report.lock}: {len(pins)} pins, {len(report.audited)} audited, "
             f"{len(report.not_audited)} not audited, {len(report.findings)} with findings "
             f"(PyPI vulnerability data fetched {report.started}, {report.seconds} s)"]
    by_release = [p for p in pins if p.source == RELEASE_SOURCE]
    lines.append(f"  {RELEASE_SOURCE}: {len(by_release)} audited"
                 + (f"; no answer for {_counted(p.release_error for p in pins if p.release_error)}"
                    if len(by_release) < len(pins) else ""))
    rest = [p for p in pins if p.source == PROJECT_SOURCE]
    if rest:
        decided = sum(1 for p in rest if p.verdict in ("vulnerable", "clean"))
        gaps = [("behind the latest release" if p.latest else "project document unavailable")
                + (" whose advisories may reach back (possibly affected)" if p.verdict in FINDINGS
                   else "") for p in rest if p.verdict not in ("vulnerable", "clean")]
        lines.append(f"  {PROJECT_SOURCE}: {decided} audited (pinned = latest release)"
                     + (f"; not audited: {_counted(gaps)}" if gaps else ""))
    for p in report.findings:
        lines.append(f"FINDING {p.name} {p.version} {p.verdict}: {_ids(p.vulnerabilities)}"
                     + (f" - {p.reason}" if p.reason else ""))
    for p in pins:
        if p.verdict == "not audited":
            lines.append(f"  not audited: {p.name} {p.version}"
                         + (f" (latest {p.latest})" if p.latest else f": {p.reason}"))
    for p in pins:
        if p.yanked:
            lines.append(f"  note: {p.name} {p.version} is {p.yanked}")
    return "\n".join(lines)


def to_json(report: AuditReport) -> dict[str, Any]:
    """The report as a JSON-ready mapping, with its totals."""
    return {"lock": report.lock, "started": report.started, "seconds": report.seconds,
            "pins": len(report.pins), "audited": len(report.audited),
            "not_audited": len(report.not_audited), "findings": len(report.findings),
            "results": [asdict(p) for p in report.pins]}


def main(argv: Sequence[str] | None = None) -> int:
    """Audit a lock, print the report; 1 on a finding (or, with --require-data, a pin not audited)."""
    parser = argparse.ArgumentParser(prog="python -m dptools.depaudit", description=__doc__.split("\n")[0])
    parser.add_argument("--lock", type=Path, default=REPO / "uv.lock", help="the uv.lock to audit")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--require-data", action="store_true",
                        help="exit 1 also when a pin could not be audited")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request")
    parser.add_argument("--deadline", type=float, default=90.0,
                        help="no request starts after this many seconds")
    parser.add_argument("--index", default=PYPI, help="the PyPI JSON API base URL")
    args = parser.parse_args(argv)
    if not args.index.startswith("https://"):
        parser.error("--index must be an https:// URL")
    try:
        pins = lock_pins(args.lock.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        parser.error(f"--lock {args.lock}: {exc}")
    if not pins:
        parser.error(f"--lock {args.lock}: no registry package pinned in it (not a uv.lock?)")
    fetch = http_fetch(args.timeout, time.monotonic() + args.deadline)
    report = audit(pins, fetch, str(args.lock), base=args.index.rstrip("/"))
    print(json.dumps(to_json(report), indent=2) if args.json else render(report))
    failed = bool(report.findings) or (args.require_data and bool(report.not_audited))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
