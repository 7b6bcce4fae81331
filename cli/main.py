"""``python path/to/pack <command>``: model files (list, verify, fetch, table), the headless runner and the
command-line trainer (``train``, :mod:`.train`).

``models`` commands use only the standard library (and PyYAML for an ``extra_model_paths.yaml``) and
never import torch; ``run`` imports the runner (and through it ComfyUI) only when it is the command given.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Sequence, TextIO

from ..deps import MissingDependencyError
from . import workflow_models as wf
from .console import say
from .fetch import FetchError, ProgressLine, fetch_entry
from .manifest import (
    MISSING,
    NESTED,
    OK,
    PACK_DIR,
    UNVERIFIED,
    EntryStatus,
    ManifestError,
    ModelEntry,
    ModelsDirError,
    ModelsLocation,
    check_entry,
    format_size,
    load_manifest,
    resolve_location,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
RESTRICTED_LICENCE_WORDS = ("non-commercial", "none stated", "research")


def pack_command() -> str:
    """How to call this pack from the current folder, e.g. ``python .`` or ``python custom_nodes/likeness``."""
    rel = os.path.relpath(PACK_DIR)
    path = rel if not rel.startswith(os.pardir + os.sep + os.pardir) else PACK_DIR
    return f"python {shlex.quote(path)}"


# --------------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=pack_command(), description="Likeness command line: model files and the headless workflow runner.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    models = commands.add_parser("models", help="list, verify, download or document the model files",
                                 description="Model files listed in models_manifest.json.")
    actions = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    manifest_only = argparse.ArgumentParser(add_help=False)
    manifest_only.add_argument("--manifest", default=None, metavar="PATH",
                               help="model manifest to use (default: the pack's models_manifest.json)")
    located = argparse.ArgumentParser(add_help=False, parents=[manifest_only])
    located.add_argument("--models-dir", default=None, metavar="DIR",
                         help="ComfyUI's models folder (default: $LIKENESS_MODELS_DIR, else the models folder "
                              "of the ComfyUI this pack is installed in)")
    located.add_argument("--extra-model-paths", default=None, metavar="YAML",
                         help="an extra_model_paths.yaml whose folders are searched too (default: the one next "
                              "to ComfyUI's models folder, if any)")

    listing = actions.add_parser("list", parents=[located], help="table of all files and whether they are present")
    listing.set_defaults(handler=cmd_list)

    verify = actions.add_parser("verify", parents=[located],
                                help="check presence, size and sha256; say where missing files go",
                                description="Without --for: the required manifest entries (what most workflows "
                                            "load) and every optional one that is installed. With --for: exactly "
                                            "the model files one workflow loads.")
    verify.add_argument("--for", dest="workflow", default=None, metavar="WORKFLOW.json",
                        help="check exactly the model files this workflow (UI or API format) loads")
    verify.add_argument("--all", action="store_true", help="also report optional files that are not installed")
    verify.add_argument("--quick", action="store_true", help="check sizes only, skip sha256 (faster)")
    verify.set_defaults(handler=cmd_verify)

    fetch = actions.add_parser("fetch", parents=[located],
                               help="download files (resumable, sha256-checked, atomic)")
    fetch.add_argument("ids", nargs="*", metavar="ID", help="manifest ids (see `models list`)")
    fetch.add_argument("--required", action="store_true", help="every required file")
    fetch.add_argument("--all", action="store_true", help="every file in the manifest (tens of GB)")
    fetch.add_argument("--force", action="store_true", help="download again even if a copy is present")
    fetch.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="network timeout (default 30)")
    fetch.set_defaults(handler=cmd_fetch)

    table = actions.add_parser("table", parents=[manifest_only], help="print the README's markdown model table")
    table.set_defaults(handler=cmd_table)

    commands.add_parser("run", add_help=False, help="run a workflow headless: run WORKFLOW.json [--set N.I=V] "
                                                    "[--out DIR] (see `run --help`)")
    commands.add_parser("eval", add_help=False, help="compare workflows on identities × prompts × seeds: the "
                                                     "papers' likeness tables, resumable (see `eval --help`)")
    commands.add_parser("train", add_help=False, help="train a Face Fusion adapter or ConsistentID on a folder, "
                                                      "also under torchrun (see `train --help`)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        return cmd_run(argv[1:])
    if argv and argv[0] == "train":
        from . import train  # imports torch and ComfyUI only after parsing its arguments
        return train.main(argv[1:])
    if argv and argv[0] == "eval":
        from . import eval as evaluation  # imports torch; ComfyUI only once the grid is checked
        return evaluation.main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return _exit_code(exc)
    try:
        return args.handler(args)
    except (ManifestError, ModelsDirError) as exc:
        say(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MissingDependencyError as exc:  # PyYAML, for an extra_model_paths.yaml
        say(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return EXIT_OK
    return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def cmd_run(argv: list[str]) -> int:
    """``run``: hand over to the headless runner, imported only now (it loads ComfyUI and torch)."""
    try:
        from . import runner
    except ImportError as exc:
        say(f"error: the run command is not available: {exc}", file=sys.stderr)
        return EXIT_FAILED
    parser = argparse.ArgumentParser(prog=f"{pack_command()} run",
                                     description="Run a ComfyUI workflow (API or UI format) in this process.")
    runner.add_run_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return _exit_code(exc)
    return int(runner.run_from_args(args) or 0)


# --------------------------------------------------------------------------------------------------
# Helpers shared by the commands


def _location(args, required: bool = True) -> ModelsLocation | None:
    try:
        return resolve_location(args.models_dir, args.extra_model_paths,
                                warn=lambda text: say(f"warning: {text}", file=sys.stderr))
    except ModelsDirError:
        if required:
            raise
        return None


def fetch_command(entry_ids: Sequence[str], args, location: ModelsLocation | None) -> str:
    """The exact command that downloads ``entry_ids`` with the same folders as this run."""
    parts = [pack_command(), "models", "fetch", *entry_ids]
    if getattr(args, "manifest", None):
        parts += ["--manifest", shlex.quote(os.path.abspath(args.manifest))]
    if location is not None and location.source == "--models-dir":
        parts += ["--models-dir", shlex.quote(location.models_dir)]
    if getattr(args, "extra_model_paths", None):
        parts += ["--extra-model-paths", shlex.quote(os.path.abspath(args.extra_model_paths))]
    return " ".join(parts)


def _print_location(location: ModelsLocation, out: TextIO) -> None:
    out.write(f"Models folder: {location.models_dir} (from {location.source})\n")
    if location.extra_paths_file:
        keys = ", ".join(sorted(location.extra_paths)) or "no folders"
        out.write(f"Extra model paths: {location.extra_paths_file} ({keys})\n")


def _display_path(entry: ModelEntry) -> str:
    if entry.is_archive:
        return f"{entry.folder}/ ({entry.filename}: {len(entry.archive_members)} files)"
    return f"{entry.folder}/{entry.filename}"


def _columns(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _hash_progress(out: TextIO):
    """A callback printing sha256 progress for big files only."""
    lines: dict[str, ProgressLine] = {}

    def report(path: str, done: int, total: int) -> None:
        if total < 200_000_000:
            return
        line = lines.setdefault(path, ProgressLine(f"sha256 {os.path.basename(path)}", total, out))
        line.finish(done) if done >= total else line.update(done)
    return report


# --------------------------------------------------------------------------------------------------
# Commands


def cmd_list(args, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    entries = load_manifest(args.manifest)
    location = _location(args, required=False)
    if location is not None:
        _print_location(location, out)
    else:
        out.write("Models folder: unknown (pass --models-dir to see what is installed)\n")
    rows = [["ID", "REQ", "FILE (under models/)", "SIZE", "LICENCE", "STATUS"]]
    for entry in entries:
        status = "?"
        if location is not None:
            state = check_entry(entry, location, hash_files=False).state
            status = "present" if state in (OK, UNVERIFIED) else state
        rows.append([entry.id, "yes" if entry.required else "no", _display_path(entry),
                     format_size(entry.size, entry.approx_size_mb), _short(entry.license, 32), status])
    _columns(rows, out)
    out.write(f"\n{len(entries)} files, {sum(e.required for e in entries)} required. "
              f"Details and sources: {pack_command()} models table\n")
    return EXIT_OK


def cmd_verify(args, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    entries = load_manifest(args.manifest)
    location = _location(args)
    _print_location(location, out)
    if args.workflow:
        return verify_workflow(args, entries, location, out)
    quick_statuses = {e.id: check_entry(e, location, hash_files=False) for e in entries}
    chosen = [e for e in entries if args.all or e.required or not quick_statuses[e.id].is_missing]
    skipped = len(entries) - len(chosen)
    out.write(_verify_scope(chosen, entries, args))
    counts = {"ok": 0, "unverified": 0, "missing": 0, "missing_required": 0, "bad": 0}
    hash_progress = _hash_progress(sys.stderr)
    for entry in chosen:
        status = check_entry(entry, location, hash_files=not args.quick, hash_progress=hash_progress)
        _report_status(status, args, location, out, counts)
    out.write("\n" + _verify_summary(counts, skipped) + "\n")
    if counts["missing_required"]:
        out.write(f"Get every required file with: {fetch_command(['--required'], args, location)}\n")
    failed = counts["missing_required"] or counts["bad"]
    return EXIT_FAILED if failed else EXIT_OK


def _report_status(status: EntryStatus, args, location: ModelsLocation, out: TextIO, counts: dict) -> None:
    entry = status.entry
    kind = "required" if entry.required else "optional"
    state = status.state
    if state == OK:
        counts["ok"] += 1
        out.write(f"  OK          {entry.id}: {status.files[0].path} ({status.files[0].detail})\n")
    elif state == UNVERIFIED:
        counts["unverified"] += 1
        where = sorted({os.path.dirname(f.path) if entry.is_archive else f.path for f in status.files})
        out.write(f"  UNVERIFIED  {entry.id}: {', '.join(where)}\n"
                  f"              {status.files[0].detail}\n")
    elif status.is_problem:
        counts["bad"] += 1
        for check in status.files:
            if check.state in (OK, UNVERIFIED, MISSING):
                continue
            out.write(f"  CORRUPT     {entry.id} ({kind}): {check.path}\n              {check.detail}\n")
        out.write(f"              replace it: {fetch_command([entry.id], args, location)}\n")
    else:  # missing or in a nested folder
        counts["missing"] += 1
        counts["missing_required"] += entry.required
        out.write(f"  MISSING     {entry.id} ({kind}, {format_size(entry.size, entry.approx_size_mb)}, "
                  f"licence: {entry.license})\n")
        for check in status.files:
            if check.state == NESTED:
                out.write(f"              {check.name}: {check.detail}\n")
            elif check.state == MISSING:
                out.write(f"              goes to {check.target}\n")
        out.write(f"              get it: {fetch_command([entry.id], args, location)}\n")


def _verify_scope(chosen: Sequence[ModelEntry], entries: Sequence[ModelEntry], args) -> str:
    """What plain ``verify`` checks and why, and how to check what one workflow needs."""
    required = [e.id for e in chosen if e.required]
    installed = [e.id for e in chosen if not e.required]
    why = f"the {len(required)} required ones ({', '.join(required)}: most workflows load them)"
    why += f" and every optional one that is installed or asked for with --all ({len(installed)})"
    hashing = "" if args.quick else " (sha256 of files with a published hash)"
    return (f"Checking {len(chosen)} of {len(entries)} manifest entries{hashing}: {why}.\n"
            f"To check exactly what one workflow needs: {pack_command()} models verify --for WORKFLOW.json\n\n")


def _verify_summary(counts: dict, skipped: int) -> str:
    text = (f"Summary: {counts['ok']} verified, {counts['unverified']} present but unverified (no published hash), "
            f"{counts['missing']} missing ({counts['missing_required']} required), {counts['bad']} corrupt.")
    if skipped:
        text += f" {skipped} optional files not installed and not listed (use --all)."
    if not counts["missing_required"] and not counts["bad"]:
        text += " All required files are in place."
    return text


def verify_workflow(args, entries: Sequence[ModelEntry], location: ModelsLocation, out: TextIO) -> int:
    """``verify --for WORKFLOW``: each model file the workflow loads, present, missing (with its fetch command),
    not in the manifest (the user provides it) or made by one of the workflow's own trainer nodes."""
    try:
        prompt, form = wf.load_prompt(args.workflow)
    except wf.WorkflowFormatError as exc:
        say(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    needed, written = wf.workflow_files(prompt)
    out.write(f"Workflow: {args.workflow} ({form} format): {len(needed)} model file(s) loaded by its nodes"
              f"{'' if args.quick else ' (sha256 of files with a published hash)'}\n\n")
    states, to_fetch = [], []
    for item in needed:
        state, ids = _report_needed(item, entries, written, location, args, out)
        states.append(state)
        if state == wf.MISSING:
            to_fetch += [i for i in ids if i not in to_fetch]
    failed = sum(state not in wf.SATISFIED for state in states)
    out.write(f"\nSummary: {len(needed) - failed} of {len(needed)} in place or made by the workflow, "
              f"{failed} not.\n")
    if len(to_fetch) > 1:
        out.write(f"Get the missing manifest files with: {fetch_command(to_fetch, args, location)}\n")
    return EXIT_FAILED if failed else EXIT_OK


def _report_needed(item: wf.NeededFile, entries: Sequence[ModelEntry], written: list[wf.WrittenFile],
                   location: ModelsLocation, args, out: TextIO) -> tuple[str, list[str]]:
    """One line (or three) about one needed file; returns its state and the ids of its manifest entries."""
    used_by = f"  [{', '.join(item.nodes)}]"
    made = wf.maker(written, item)
    if made is not None:
        out.write(f"  MADE        {item.relative}: written by {made.node} when the workflow runs{used_by}\n")
        return wf.MADE, []
    entry = wf.manifest_entry(entries, item)
    if entry is None and wf.folder_entries(entries, item):
        return _report_folder(item, wf.folder_entries(entries, item), location, args, out, used_by)
    if entry is None:
        return _report_unlisted(item, location, out, used_by), []
    status = check_entry(entry, location, hash_files=not args.quick, hash_progress=_hash_progress(sys.stderr))
    if status.state in (OK, UNVERIFIED):
        where = sorted({os.path.dirname(f.path) if entry.is_archive else f.path for f in status.files})
        detail = "" if entry.is_archive else f"; {status.files[0].detail}"
        out.write(f"  OK          {item.relative} ({entry.id}: {', '.join(where)}{detail}){used_by}\n")
        return wf.PRESENT, [entry.id]
    if status.is_problem:
        bad = next(f for f in status.files if f.state not in (OK, UNVERIFIED, MISSING))
        out.write(f"  CORRUPT     {item.relative} ({entry.id}): {bad.path}{used_by}\n              {bad.detail}\n"
                  f"              replace it: {fetch_command([entry.id], args, location)}\n")
        return wf.CORRUPT, [entry.id]
    out.write(f"  MISSING     {item.relative} ({entry.id}, {format_size(entry.size, entry.approx_size_mb)}, "
              f"licence: {entry.license}){used_by}\n"
              f"              get it: {fetch_command([entry.id], args, location)}\n")
    return wf.MISSING, [entry.id]


def _report_folder(item: wf.NeededFile, parts: Sequence[ModelEntry], location: ModelsLocation, args, out: TextIO,
                   used_by: str) -> tuple[str, list[str]]:
    """A folder the manifest lists file by file (a diffusers model folder): OK when every file is in place,
    else the files that are corrupt or missing and one fetch command for them."""
    hash_progress = _hash_progress(sys.stderr)
    statuses = [(entry, check_entry(entry, location, hash_files=not args.quick, hash_progress=hash_progress))
                for entry in parts]
    corrupt = [entry.id for entry, status in statuses if status.is_problem]
    missing = [entry.id for entry, status in statuses if status.state not in (OK, UNVERIFIED)
               and not status.is_problem]
    if not corrupt and not missing:
        out.write(f"  OK          {item.relative} (all {len(parts)} manifest files: {parts[0].id} …){used_by}\n")
        return wf.PRESENT, [entry.id for entry in parts]
    state, label, ids = (wf.CORRUPT, "CORRUPT ", corrupt) if corrupt else (wf.MISSING, "MISSING ", missing)
    out.write(f"  {label}    {item.relative} ({len(ids)} of its {len(parts)} manifest files: {', '.join(ids)})"
              f"{used_by}\n              get {'them' if len(ids) > 1 else 'it'}: "
              f"{fetch_command(ids, args, location)}\n")
    return state, ids


def _report_unlisted(item: wf.NeededFile, location: ModelsLocation, out: TextIO, used_by: str) -> str:
    """A file the manifest does not list: present (unverified), or the user must provide it."""
    if item.is_placeholder:
        out.write(f"  NO FILE     models/{item.folder}/: the node shows {item.value!r}{used_by}\n"
                  f"              put a file into models/{item.folder}/ and choose it in the node\n")
        return wf.NOT_CHOSEN
    path, tried = wf.find_on_disk(location, item)
    if path is not None:
        out.write(f"  PRESENT     {item.relative} ({path}; not in the manifest, so not verified){used_by}\n")
        return wf.UNLISTED_PRESENT
    makers = wf.makers_of_folder(item.folder)
    how = f"train it with {' or '.join(makers)}, or copy" if makers else "copy"
    out.write(f"  NOT FOUND   {item.relative}: not in the manifest; {how} your own file to models/{item.relative}"
              f"{used_by}\n              looked in: {', '.join(tried)}\n")
    return wf.UNLISTED_MISSING


def cmd_fetch(args, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    entries = load_manifest(args.manifest)
    by_id = {e.id: e for e in entries}
    unknown = [i for i in args.ids if i not in by_id]
    if unknown:
        say(f"error: unknown model id(s): {', '.join(unknown)}. Known ids: {', '.join(by_id)}", file=sys.stderr)
        return EXIT_USAGE
    chosen = [by_id[i] for i in dict.fromkeys(args.ids)]
    if args.required or args.all:
        chosen += [e for e in entries if (args.all or e.required) and e not in chosen]
    if not chosen:
        say("error: name the files to fetch (ids from `models list`), or use --required / --all.",
              file=sys.stderr)
        return EXIT_USAGE
    location = _location(args)
    _print_location(location, out)
    for entry in chosen:
        if any(word in entry.license.lower() for word in RESTRICTED_LICENCE_WORDS):
            out.write(f"note: {entry.id} is licensed '{entry.license}': check that your use is allowed.\n")
    failures = 0
    for entry in chosen:
        try:
            result = fetch_entry(entry, location, force=args.force, stream=sys.stderr, timeout=args.timeout)
        except FetchError as exc:
            failures += 1
            say(f"error: {exc}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            say(f"\ninterrupted: run `{fetch_command([entry.id], args, location)}` to resume.", file=sys.stderr)
            return EXIT_INTERRUPTED
        out.write(f"{entry.id}: {result.message}\n")
    if failures:
        out.write(f"{failures} of {len(chosen)} downloads failed (see the errors above).\n")
        return EXIT_FAILED
    return EXIT_OK


def cmd_table(args, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    out.write(render_table(load_manifest(args.manifest)))
    return EXIT_OK


def render_table(entries: Sequence[ModelEntry]) -> str:
    """The README's model table (markdown), generated from the manifest."""
    lines = ["| Model id | File → folder under `models/` | Size | Licence | Used by | Required |",
             "|---|---|---|---|---|---|"]
    for entry in entries:
        if entry.is_archive:
            where = f"[{entry.filename}]({entry.url}) → `{entry.folder}/` ({', '.join(entry.archive_members)})"
        else:
            where = f"[{entry.filename}]({entry.url}) → `{entry.folder}/`"
        checked = "" if entry.sha256 else " (no published hash)"
        lines.append(f"| `{entry.id}` | {where} | {format_size(entry.size, entry.approx_size_mb)}{checked} | "
                     f"{entry.license} | {', '.join(entry.techniques)} | {'yes' if entry.required else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
