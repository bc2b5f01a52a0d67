"""The device check's closing table: one line per stage, from its exit code and its JSON.

    python -m bench.device_summary OUT_DIR STAGES_TSV

STAGES_TSV has one `name<TAB>exit<TAB>seconds<TAB>json-or-dash` line per stage (written by
bench/device_check.sh). For each stage the table shows what its JSON says (`status`: no GPU,
complete, stopped by budget, ...) and its headline figure, so that a glance tells which
stages measured something. Stdlib only: it must work whatever else is broken.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def _load(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def headline(data: dict[str, Any]) -> str:
    """The stage's main figure, read from whichever result layout it wrote."""
    rows = [r for r in data.get("results", []) if "error" not in r]
    errors = len(data.get("results", [])) - len(rows)
    parts = []
    if rows and "images_per_s" in rows[0]:
        parts += [f"{r['path']} {r['images_per_s']:.0f} img/s" for r in rows]
    elif rows:
        parts.append(f"{len(rows)} timings")
    if data.get("not_run"):
        parts.append(f"{len(data['not_run'])} not run")
    if errors:
        parts.append(f"{errors} failed")
    recs = data.get("last_train_records") or []
    if recs and "images_per_s" in recs[-1]:
        parts.append(f"{data.get('steps')} steps, {recs[-1]['images_per_s']:.0f} img/s")
    return "; ".join(parts)


def junit(path: str) -> dict[str, Any] | None:
    """pytest's junit XML as {"status", "results": []} with the counts in the status."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return {"status": f"{passed} passed, {n['failures'] + n['errors']} failed, "
                      f"{n['skipped']} skipped"}


def stage_data(out_dir: str, source: str) -> dict[str, Any] | None:
    """source: a JSON or junit XML file under out_dir, 'status:TEXT', or '-'."""
    if source.startswith("status:"):
        return {"status": source[len("status:"):]}
    if source == "-":
        return None
    path = os.path.join(out_dir, source)
    return junit(path) if source.endswith(".xml") else _load(path)


def table(out_dir: str, stages: list[list[str]]) -> str:
    lines = [f"{'stage':<16}{'exit':>5}{'secs':>6}  {'status':<36}result"]
    for name, code, secs, source in stages:
        data = stage_data(out_dir, source)
        status = (data or {}).get("status", "-" if source == "-" else "nothing written")
        if code == "124" or code == "137":
            status = f"TIME BOX HIT ({status})"
        lines.append(f"{name:<16}{code:>5}{secs:>6}  {status:<36}"
                     f"{headline(data) if data else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m bench.device_summary OUT_DIR STAGES_TSV", file=sys.stderr)
        return 2
    out_dir, tsv = argv
    with open(tsv) as f:
        stages = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    print(table(out_dir, stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
