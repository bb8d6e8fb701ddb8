"""The dependency audit's verdicts, on fake PyPI documents (the real audit runs in test_security.py)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from dptools.depaudit import (
    PROJECT_SOURCE,
    RELEASE_SOURCE,
    Answer,
    Pin,
    audit,
    judge,
    lock_pins,
    main,
    render,
    to_json,
)


def _package(name: str, version: str, source: str, *extra: str) -> str:
    """One `[[package]]` entry of a uv.lock; `source` is the inside of its source table."""
    return "\n".join(["[[package]]", f'name = "{name}"', f'version = "{version}"', f"source = {{ {source} }}",
                      *extra, ""])


PYPI = 'registry = "https://pypi.org/simple"'
LOCK = "\n".join([
    "version = 1\n",
    _package("dataproc-shared", "0.1.0", 'editable = "shared"'),
    _package("numpy", "2.4.6", PYPI, """resolution-markers = ["python_full_version < '3.12'"]"""),
    _package("numpy", "2.5.5", PYPI),
    _package("local-thing", "1.0", 'directory = "vendor/local-thing"'),
    _package("certifi", "2026.10.18", PYPI),
])


def _vuln(vid: str, fixed_in: list[str] | None = None, withdrawn: str | None = None) -> dict[str, Any]:
    return {"id": vid, "aliases": [f"CVE-{vid}"], "fixed_in": fixed_in or [], "withdrawn": withdrawn,
            "link": f"https://osv.dev/vulnerability/{vid}", "details": "...", "source": "osv"}


def _project(latest: str, versions: list[str], vulns: list[dict[str, Any]] | None = None,
             yanked: Mapping[str, str] | None = None) -> Answer:
    yanked = yanked or {}
    releases = {v: [{"filename": f"x-{v}.whl", "yanked": v in yanked, "yanked_reason": yanked.get(v)}]
                for v in versions}
    return Answer({"info": {"version": latest}, "releases": releases, "urls": releases.get(latest, []),
                   "vulnerabilities": vulns or []}, status=200)


NOT_FOUND = Answer(None, status=404, error="HTTP 404")


def test_lock_pins_are_the_registry_packages_of_every_platform() -> None:
    assert lock_pins(LOCK) == [Pin("certifi", "2026.10.18"), Pin("numpy", "2.4.6"), Pin("numpy", "2.5.5")]


def test_release_document_decides_for_its_own_version() -> None:
    pin = Pin("urllib3", "1.26.4")
    release = Answer({"info": {"version": "1.26.4"}, "urls": [],
                      "vulnerabilities": [_vuln("PYSEC-2023-192", ["1.26.17", "2.0.6"])]}, status=200)
    report = judge(pin, release, None)
    assert (report.verdict, report.source) == ("vulnerable", RELEASE_SOURCE)
    assert [v.id for v in report.vulnerabilities] == ["PYSEC-2023-192"]
    assert report.vulnerabilities[0].fixed_in == ("1.26.17", "2.0.6")
    clean = judge(pin, Answer({"info": {"version": "1.26.4"}, "vulnerabilities": []}, status=200), None)
    assert (clean.verdict, clean.source) == ("clean", RELEASE_SOURCE)


def test_release_document_of_another_version_is_not_taken_for_the_pin() -> None:
    wrong = Answer({"info": {"version": "2.0.0"}, "vulnerabilities": []}, status=200)
    report = judge(Pin("x", "1.0.0"), wrong, _project("2.0.0", ["1.0.0", "2.0.0"]))
    assert report.verdict == "not audited"


def test_latest_release_is_audited_by_the_project_document() -> None:
    pin = Pin("pycrypto", "2.6.1")
    report = judge(pin, NOT_FOUND, _project("2.6.1", ["2.6", "2.6.1"], [_vuln("PYSEC-2017-94")]))
    assert (report.verdict, report.source, report.latest) == ("vulnerable", PROJECT_SOURCE, "2.6.1")
    clean = judge(pin, NOT_FOUND, _project("2.6.1", ["2.6.1"]))
    assert clean.verdict == "clean"


def test_pin_behind_a_clean_latest_release_is_not_audited() -> None:
    report = judge(Pin("idna", "3.20"), NOT_FOUND, _project("3.21", ["3.20", "3.21"]))
    assert report.verdict == "not audited"
    assert report.latest == "3.21"
    assert "behind the latest release 3.21" in report.reason
    assert "HTTP 404" in report.reason


def test_pin_behind_an_affected_latest_release_is_a_possible_finding() -> None:
    project = _project("0.19.2", ["0.19.1", "0.19.2"], [_vuln("GHSA-wj6h-64fc-37mp")])
    report = judge(Pin("ecdsa", "0.19.1"), NOT_FOUND, project)
    assert report.verdict == "possibly affected"
    assert "0.19.2 is affected" in report.reason
    whole = audit([Pin("ecdsa", "0.19.1")], lambda url: project if url.endswith("ecdsa/json") else NOT_FOUND)
    assert (len(whole.audited), len(whole.not_audited), len(whole.findings)) == (0, 1, 1)
    assert "FINDING ecdsa 0.19.1 possibly affected: GHSA-wj6h-64fc-37mp (no fix)" in render(whole)


def test_withdrawn_advisories_are_ignored() -> None:
    project = _project("1.0", ["1.0"], [_vuln("PYSEC-1", withdrawn="2026-01-02T00:00:00Z")])
    assert judge(Pin("x", "1.0"), NOT_FOUND, project).verdict == "clean"


def test_unreachable_registry_is_not_audited_with_the_reason() -> None:
    down = Answer(None, error="unreachable (URLError: timed out)")
    report = judge(Pin("x", "1.0"), down, down)
    assert report.verdict == "not audited"
    assert "timed out" in report.reason


def test_yanked_pin_is_noted() -> None:
    report = judge(Pin("x", "1.0"), NOT_FOUND, _project("1.1", ["1.0", "1.1"], yanked={"1.0": "CVE fix"}))
    assert report.yanked == "yanked: CVE fix"


def test_pin_missing_from_the_releases_says_so() -> None:
    report = judge(Pin("x", "0.9"), NOT_FOUND, _project("1.1", ["1.0", "1.1"]))
    assert "not among the project's releases" in report.reason


def test_audit_fetches_the_project_document_only_without_release_data() -> None:
    asked: list[str] = []
    docs = {
        "https://p/a/1.0/json": Answer({"info": {"version": "1.0"}, "vulnerabilities": []}, status=200),
        "https://p/b/json": _project("2.0", ["1.0", "2.0"]),
        "https://p/c/json": _project("3.0", ["3.0"], [_vuln("PYSEC-9", ["3.1"])]),
    }

    def fetch(url: str) -> Answer:
        asked.append(url)
        return docs.get(url, NOT_FOUND)

    pins = [Pin("a", "1.0"), Pin("b", "1.0"), Pin("c", "3.0")]
    report = audit(pins, fetch, lock="test.lock", workers=2, base="https://p")
    assert sorted(asked) == ["https://p/a/1.0/json", "https://p/b/1.0/json", "https://p/b/json",
                             "https://p/c/3.0/json", "https://p/c/json"]
    assert [p.verdict for p in report.pins] == ["clean", "not audited", "vulnerable"]
    assert (len(report.audited), len(report.not_audited), len(report.findings)) == (2, 1, 1)
    text = render(report)
    assert "3 pins, 2 audited, 1 not audited, 1 with findings" in text
    assert "FINDING c 3.0 vulnerable: PYSEC-9 (fixed in 3.1)" in text
    assert "not audited: b 1.0 (latest 2.0)" in text
    assert f"{RELEASE_SOURCE}: 1 audited; no answer for 2 HTTP 404" in text
    assert f"{PROJECT_SOURCE}: 1 audited (pinned = latest release); not audited: 1 behind" in text
    assert to_json(report)["findings"] == 1


def test_document_without_a_vulnerabilities_field_is_no_data() -> None:
    no_field = Answer({"info": {"version": "1.0"}, "releases": {"1.0": []}}, status=200)
    report = judge(Pin("x", "1.0"), no_field, no_field)
    assert report.verdict == "not audited"
    assert "no vulnerability data in it" in report.reason


@pytest.mark.parametrize(("text", "message"), [
    (None, "No such file"),
    ("x = [", "Invalid value"),
    ('[project]\nname = "x"\n', "no registry package pinned in it"),
])
def test_bad_lock_is_refused_before_any_request(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                text: str | None, message: str) -> None:
    lock = tmp_path / "uv.lock"
    if text is not None:
        lock.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["--lock", str(lock), "--index", "https://127.0.0.1:1/pypi"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_index_must_be_https(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--index", "http://127.0.0.1:1/pypi"])
    assert "https://" in capsys.readouterr().err
