"""Renderers of scan and purify reports for people and dashboards: Markdown, HTML, SARIF.

* Markdown: a short summary for a pull request or a ticket.
* HTML: one self-contained file (the trigger picture inlined as a data URI, no external
  resources): verdict, findings, the before/after table of a purification, provenance.
* SARIF 2.1.0: one result per finding, the model file as the artifact, for code-scanning
  dashboards: its location relative to a base folder (``uriBaseId`` ``SRCROOT``, declared in
  the run's ``originalUriBaseIds``), a ``partialFingerprints`` entry from the model's sha256
  and the rule, and the run's whole command line in the invocation.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from clipguard.report import Metrics, Report

Format = Literal["json", "md", "html", "sarif"]
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
#: the uriBaseId of the SARIF artifact locations: the folder given as ``--sarif-base``
SARIF_BASE_ID = "SRCROOT"
#: the name of the partialFingerprints entry (a sha256 of rule id and model sha256)
SARIF_FINGERPRINT = "clipguardModelRule/v1"
_SARIF_LEVEL = {"backdoor": "error", "inconclusive": "warning", "clean": "note"}


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def _metric_rows(report: Report) -> list[tuple[str, Metrics, Metrics, str]]:
    purification = report.purification
    if purification is None:
        return []
    rows = []
    attack = purification.attack
    label = f"{attack.name} -> {attack.target_class}" if attack else "no attack given"
    rows.append(("held-out images", purification.before, purification.after, label))
    if purification.inverted_trigger_before and purification.inverted_trigger_after:
        target = purification.inverted_trigger_attack
        rows.append(
            (
                "inverted trigger",
                purification.inverted_trigger_before,
                purification.inverted_trigger_after,
                f"inverted -> {target.target_class}" if target else "inverted",
            )
        )
    return rows


def lost_class_warnings(report: Report) -> list[str]:
    """One sentence per class the purification all but lost (empty for a scan report)."""
    if report.purification is None:
        return []
    return [
        f"class {lost.name!r} is all but lost: recall {_percent(lost.recall_before)} -> "
        f"{_percent(lost.recall_after)}; the purified prompts no longer tell its clean images "
        "from triggered ones"
        for lost in report.purification.lost_classes
    ]


def next_step_lines(report: Report) -> list[str]:
    """One line per next step of every inconclusive finding: the command that settles it
    (``clipguard scan MODEL ... ARGS``) and why (empty when there are none)."""
    return [
        f"next ({finding.scanner}): clipguard scan {report.model.path} --data {report.data.path} "
        f"... {' '.join(step.args)}  # {step.text}"
        for finding in report.findings
        for step in finding.next_steps
    ]


def render(report: Report, fmt: Format | str, sarif_base: Path | None = None) -> str:
    """The report in format ``fmt`` as text (``sarif_base``: see :func:`to_sarif`)."""
    if fmt == "json":
        return report.model_dump_json(indent=2) + "\n"
    if fmt == "md":
        return to_markdown(report)
    if fmt == "html":
        return to_html(report)
    if fmt == "sarif":
        return json.dumps(to_sarif(report, sarif_base), indent=2) + "\n"
    raise ValueError(f"unknown format {fmt!r}")


def _run_path(report: Report, path: str) -> Path:
    """``path`` as recorded in ``report``, absolute: a relative one is taken relative to the
    folder the run worked in (the current folder for a report that does not say)."""
    recorded = Path(path)
    if recorded.is_absolute():
        return recorded
    return Path(os.path.abspath(Path(report.run.working_directory or os.getcwd()) / recorded))


def to_markdown(report: Report) -> str:
    """A Markdown summary: verdict, findings, before/after metrics, provenance."""
    lines = [f"# clipguard {report.kind} report", ""]
    if report.kind == "scan":
        lines += [f"**Verdict: {report.verdict}**", ""]
    lines += [
        f"- model: `{report.model.path}` (sha256 `{report.model.sha256[:16]}…`, "
        f"{report.model.architecture}, {report.model.parameters:,} parameters)",
        f"- data: `{report.data.path}` ({len(report.data.classes)} classes, "
        f"{report.data.shots} shots per class, files sha256 `{report.data.files_sha256[:16]}…`)",
        f"- run: seed {report.run.seed}, {report.run.device}, {report.run.seconds:.1f} s, "
        f"clipguard {report.tool.clipguard}, torch {report.tool.torch}",
        "",
    ]
    if report.findings:
        lines += [
            "| scanner | verdict | score | target class | explanation |",
            "|---|---|---|---|---|",
        ]
        for f in report.findings:
            lines.append(
                f"| {f.scanner} {f.scanner_version} | {f.verdict} | {f.score:.3f} | "
                f"{f.target_class or '-'} | {f.explanation} |"
            )
        lines.append("")
        if next_step_lines(report):
            lines += ["Next steps:", *[f"- `{line}`" for line in next_step_lines(report)], ""]
    rows = _metric_rows(report)
    if rows:
        purification = report.purification
        assert purification is not None
        lines += [
            f"Purifier: {purification.purifier} {purification.purifier_version}, evaluated on "
            f"{purification.evaluation_data}.",
            "",
            "| measured on | attack | CA before | CA after | ASR before | ASR after |",
            "|---|---|---|---|---|---|",
        ]
        for name, before, after, attack in rows:
            lines.append(
                f"| {name} | {attack} | {_percent(before.clean_accuracy)} | "
                f"{_percent(after.clean_accuracy)} | {_percent(before.attack_success_rate)} | "
                f"{_percent(after.attack_success_rate)} |"
            )
        lines.append("")
        warnings = lost_class_warnings(report)
        if warnings:
            lines += ["Warnings:", *[f"- {w}" for w in warnings], ""]
    if report.errors:
        lines += ["Plugin errors:", *[f"- {e}" for e in report.errors], ""]
    return "\n".join(lines)


def _inline_image(report: Report, path: str) -> str | None:
    file = _run_path(report, path)
    if not file.is_file() or file.suffix.lower() != ".png":
        return None
    return "data:image/png;base64," + base64.b64encode(file.read_bytes()).decode("ascii")


def to_html(report: Report) -> str:
    """One self-contained HTML page (no external resources; images inlined)."""
    e = html.escape
    verdict_colour = {"backdoor": "#b00020", "clean": "#1b7f3b", "inconclusive": "#a66300"}
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>clipguard {e(report.kind)} report</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.3em .6em}"
        "th{background:#eee}.verdict{font-size:1.6em;font-weight:bold;padding:.4em;color:#fff}"
        "img{image-rendering:pixelated;max-width:100%;border:1px solid #ccc}</style></head><body>",
        f"<h1>clipguard {e(report.kind)} report</h1>",
    ]
    if report.kind == "scan":
        colour = verdict_colour[report.verdict]
        parts.append(
            f"<div class='verdict' id='verdict' style='background:{colour}'>"
            f"Verdict: {e(report.verdict)}</div>"
        )
    for finding in report.findings:
        parts += [
            f"<h2>Scanner {e(finding.scanner)} {e(finding.scanner_version)}</h2>",
            "<table><tr><th>verdict</th><th>score</th><th>target class</th>"
            "<th>explanation</th></tr>",
            f"<tr><td>{e(finding.verdict)}</td><td>{finding.score:.3f}</td>"
            f"<td>{e(finding.target_class or '-')}</td>"
            f"<td>{e(finding.explanation)}</td></tr></table>",
        ]
        for name, path in finding.artifacts.items():
            data_uri = _inline_image(report, path)
            if data_uri:
                parts.append(
                    f"<figure><img id='trigger-image' alt='{e(name)}' src='{data_uri}'>"
                    f"<figcaption>{e(name)}</figcaption></figure>"
                )
        if finding.statistics:
            parts.append("<details><summary>statistics</summary><pre>")
            parts.append(e(json.dumps(finding.statistics, indent=2, default=str)))
            parts.append("</pre></details>")
    if next_step_lines(report):
        parts.append("<h2>Next steps</h2><ul id='next-steps'>")
        parts += [f"<li><code>{e(line)}</code></li>" for line in next_step_lines(report)]
        parts.append("</ul>")
    rows = _metric_rows(report)
    if rows:
        purification = report.purification
        assert purification is not None
        parts += [
            f"<h2>Purification: {e(purification.purifier)} {e(purification.purifier_version)}</h2>",
            f"<p>Evaluated on {e(purification.evaluation_data)}.</p>",
            "<table id='before-after'><tr><th>measured on</th><th>attack</th><th>CA before</th>"
            "<th>CA after</th><th>ASR before</th><th>ASR after</th></tr>",
        ]
        for name, before, after, attack in rows:
            parts.append(
                f"<tr><td>{e(name)}</td><td>{e(attack)}</td>"
                f"<td>{_percent(before.clean_accuracy)}</td><td>{_percent(after.clean_accuracy)}</td>"
                f"<td>{_percent(before.attack_success_rate)}</td>"
                f"<td>{_percent(after.attack_success_rate)}</td></tr>"
            )
        parts.append("</table>")
        parts += [f"<p class='warning'>warning: {e(w)}</p>" for w in lost_class_warnings(report)]
    model, data, run, tool = report.model, report.data, report.run, report.tool
    provenance = [
        ("model", f"{model.path} ({model.architecture}, {model.parameters:,} parameters)"),
        ("model sha256", model.sha256),
        ("data", f"{data.path}: {len(data.classes)} classes, {data.shots} shots per class"),
        ("data files sha256", data.files_sha256),
        ("seed / device", f"{run.seed} / {run.device}"),
        ("started / seconds", f"{run.started_at.isoformat()} / {run.seconds:.1f}"),
        ("versions", f"clipguard {tool.clipguard}, torch {tool.torch}, open_clip {tool.open_clip}"),
    ]
    parts.append("<h2>Provenance</h2><table>")
    parts += [f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in provenance]
    parts.append("</table>")
    if report.errors:
        parts.append("<h2>Plugin errors</h2><ul>")
        parts += [f"<li>{e(error)}</li>" for error in report.errors]
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return "".join(parts)


def _model_location(report: Report, base: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's SARIF ``artifactLocation`` and the run's ``originalUriBaseIds``: a
    percent-encoded uri relative to ``base`` with ``uriBaseId`` :data:`SARIF_BASE_ID` when the
    model lies under ``base``, else its absolute ``file:`` uri (and no base ids)."""
    if report.model.path is None:
        return {"uri": f"sha256/{report.model.sha256}"}, {}
    model = _run_path(report, report.model.path)
    base = Path(os.path.abspath(base))
    if not model.is_relative_to(base):
        return {"uri": model.as_uri()}, {}
    relative = model.relative_to(base).as_posix()
    location = {"uri": quote(relative), "uriBaseId": SARIF_BASE_ID}
    return location, {SARIF_BASE_ID: {"uri": base.as_uri().rstrip("/") + "/"}}


def _fingerprint(report: Report, rule_id: str, *detail: str) -> dict[str, str]:
    """The result's ``partialFingerprints``: a sha256 of the rule, the model's sha256 and
    ``detail`` (what tells two results of one rule on one model apart)."""
    key = "\0".join((rule_id, report.model.sha256, *detail))
    return {SARIF_FINGERPRINT: hashlib.sha256(key.encode("utf-8")).hexdigest()}


def to_sarif(report: Report, base: Path | None = None) -> dict:
    """A SARIF 2.1.0 log: one run, one result per finding, the model file as the artifact.

    The model's location is relative to ``base`` (default: the current folder) through the
    ``uriBaseId`` :data:`SARIF_BASE_ID`, which ``originalUriBaseIds`` maps to ``base``'s
    absolute uri; a model outside ``base`` keeps its absolute ``file:`` uri. Each result has
    a ``partialFingerprints`` entry (:data:`SARIF_FINGERPRINT`) from its rule and the model's
    sha256, so a code-scanning service tracks the same finding on the same model across
    runs. The invocation carries the run's whole command line and working folder.
    """
    location, base_ids = _model_location(report, Path.cwd() if base is None else base)
    model_location = {**location, "index": 0}
    rules = []
    results = []
    for finding in report.findings:
        rule_id = f"clipguard/{finding.scanner}/backdoor"
        if rule_id not in [rule["id"] for rule in rules]:
            rules.append(
                {
                    "id": rule_id,
                    "name": "ClipBackdoor",
                    "shortDescription": {"text": "CLIP model backdoor"},
                    "fullDescription": {
                        "text": f"Backdoor evidence found by the {finding.scanner} scanner."
                    },
                }
            )
        target = (
            f" (suspected target class: {finding.target_class})" if finding.target_class else ""
        )
        results.append(
            {
                "ruleId": rule_id,
                "level": _SARIF_LEVEL[finding.verdict],
                "kind": "fail"
                if finding.verdict == "backdoor"
                else "review"
                if finding.verdict == "inconclusive"
                else "pass",
                "message": {"text": f"{finding.verdict}{target}: {finding.explanation}"},
                "locations": [{"physicalLocation": {"artifactLocation": model_location}}],
                "partialFingerprints": _fingerprint(report, rule_id),
                "properties": {
                    "score": finding.score,
                    "targetClass": finding.target_class,
                    "statistics": finding.statistics,
                },
            }
        )
    purification = report.purification
    if purification is not None and purification.lost_classes:
        rule_id = f"clipguard/{purification.purifier}/lost-class"
        rules.append(
            {
                "id": rule_id,
                "name": "LostClass",
                "shortDescription": {"text": "class lost by purification"},
                "fullDescription": {
                    "text": "The purified classifier all but stopped recognising a class."
                },
            }
        )
        for lost, text in zip(purification.lost_classes, lost_class_warnings(report), strict=True):
            results.append(
                {
                    "ruleId": rule_id,
                    "level": "warning",
                    "kind": "review",
                    "message": {"text": text},
                    "locations": [{"physicalLocation": {"artifactLocation": model_location}}],
                    "partialFingerprints": _fingerprint(report, rule_id, lost.name),
                    "properties": lost.model_dump(),
                }
            )
    invocation: dict[str, Any] = {
        "executionSuccessful": not report.errors,
        "commandLine": report.run.command,
        "startTimeUtc": report.run.started_at.isoformat(),
        "endTimeUtc": report.run.finished_at.isoformat(),
    }
    if report.run.working_directory is not None:
        invocation["workingDirectory"] = {
            "uri": Path(report.run.working_directory).as_uri().rstrip("/") + "/"
        }
    run: dict[str, Any] = {
        "tool": {
            "driver": {
                "name": "clipguard",
                "version": report.tool.clipguard,
                "informationUri": "https://arxiv.org/abs/2502.19269",
                "rules": rules,
            }
        },
        "artifacts": [{"location": location, "hashes": {"sha-256": report.model.sha256}}],
        "results": results,
        "invocations": [invocation],
    }
    if base_ids:
        run["originalUriBaseIds"] = base_ids
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}
