"""Case files -> validated Case objects: keys, types, task inputs, path resolution, batches, outputs."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bernini import outputs
from bernini.guidance import get_mode
from bernini.tasks import TASKS, Task, get_task

log = logging.getLogger(__name__)

CASE_KEYS = ("task_type", "guidance_mode", "prompt", "video", "image", "images", "output")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://")


class CaseError(ValueError):
    """A case that cannot run; the message names the case, the key and the rule."""


class JsonObject(dict):
    """A parsed JSON object that remembers the keys it held more than once (json.loads keeps the last silently)."""

    duplicates: tuple[str, ...] = ()


def _json_object(pairs: list[tuple[str, Any]]) -> JsonObject:
    obj = JsonObject(pairs)
    if len(obj) != len(pairs):
        keys = [k for k, _ in pairs]
        obj.duplicates = tuple(k for k in dict.fromkeys(keys) if keys.count(k) > 1)
    return obj


def parse_json(text: str) -> Any:
    """json.loads whose objects are JsonObjects (so duplicate keys can be refused by name)."""
    return json.loads(text, object_pairs_hook=_json_object)


@dataclass(frozen=True)
class Case:
    """One render: routing, prompt and media (absolute paths) and where the result goes."""

    name: str  # unique within a batch; used for default output names and the summary
    source: str  # the case file (or '<command line>', 'inputs.jsonl:3')
    task_type: str
    prompt: str
    guidance_mode: str | None = None  # None: the task's default (or --guidance_mode)
    videos: tuple[Path, ...] = ()
    image: Path | None = None
    images: tuple[Path, ...] = ()
    output: Path | None = None
    explicit_output: bool = False
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def task(self) -> Task:
        return TASKS[self.task_type]

    def media(self) -> list[Path]:
        return [*self.videos, *([self.image] if self.image else []), *self.images]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "task_type": self.task_type,
            "guidance_mode": self.guidance_mode,
            "prompt": self.prompt,
            "video": [str(p) for p in self.videos],
            "image": str(self.image) if self.image else None,
            "images": [str(p) for p in self.images],
            "output": str(self.output) if self.output else None,
        }


def _fail(source: str, key: str | None, rule: str) -> CaseError:
    where = f"{source}: key {key!r}: " if key else f"{source}: "
    return CaseError(where + rule)


def _resolve_media(value: str, source: str, key: str, base: Path | None) -> Path:
    if _URL.match(value):
        raise _fail(source, key, f"{value!r} is a URL; URLs are not accepted, download the file and give its path")
    path = Path(os.path.expanduser(value))
    candidates = [path] if path.is_absolute() else ([base / path] if base else []) + [Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    tried = ", ".join(os.path.normpath(c) for c in candidates)
    raise _fail(source, key, f"file {value!r} not found (looked at: {tried}); paths are relative to the case file's folder, then the working directory")


def _string_list(value: Any, source: str, key: str, allow_single: bool) -> list[str]:
    if isinstance(value, str) and allow_single:
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    kind = "a path or a list of paths" if allow_single else "a list of paths"
    raise _fail(source, key, f"must be {kind} (non-empty strings), got {json.dumps(value)[:80]}")


def parse_case(
    data: Any, *, source: str, name: str, base: Path | None, defaults: Mapping[str, Any] | None = None
) -> Case:
    """Validate one case dict (a case file's object, or a task of --inputs) against the task table.

    `defaults` holds the command-line values (task_type, prompt, video...) that the case's keys
    override, as the official CLI does.
    """
    if not isinstance(data, dict):
        raise _fail(source, None, f"a case must be a JSON object, got {type(data).__name__}")
    duplicates = getattr(data, "duplicates", ())
    if duplicates:
        raise _fail(source, duplicates[0], "appears more than once in this object (JSON would silently keep the last value); keep exactly one")
    unknown = sorted(set(data) - set(CASE_KEYS))
    if unknown:
        raise _fail(source, unknown[0], f"unknown key; allowed keys: {', '.join(CASE_KEYS)} (generation settings such as seed or num_frames are command-line flags)")
    merged = {**{k: v for k, v in (defaults or {}).items() if v is not None}, **data}
    prompt = _prompt_of(merged, source)
    task = _task_of(merged, source)
    mode = _mode_of(merged, source)
    # Media from the case file resolve against its folder; command-line media against the cwd.
    bases = {key: (base if key in data else None) for key in ("video", "image", "images")}
    videos = _media_list(merged, "video", source, bases["video"], allow_single=True)
    image = _single_media(merged, "image", source, bases["image"])
    images = _media_list(merged, "images", source, bases["images"], allow_single=False)
    # Any media with any task, as upstream (the task only picks the system prompt); plan.py warns about mismatches.
    output = merged.get("output")
    if output is not None and (not isinstance(output, str) or not output.strip()):
        raise _fail(source, "output", f"must be a non-empty path string, got {json.dumps(output)[:80]}")
    return Case(
        name=name,
        source=source,
        task_type=task.name,
        prompt=prompt,
        guidance_mode=mode,
        videos=tuple(videos),
        image=image,
        images=tuple(images),
        output=Path(output).expanduser() if output else None,
        explicit_output="output" in data,
        raw=dict(data),
    )


def _prompt_of(merged: Mapping[str, Any], source: str) -> str:
    prompt = merged.get("prompt")
    if prompt is None:
        raise _fail(source, "prompt", "required: a non-empty string (or --prompt on the command line)")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _fail(source, "prompt", f"must be a non-empty string, got {json.dumps(prompt)[:80]}")
    return prompt


def _task_of(merged: Mapping[str, Any], source: str) -> Task:
    task_type = merged.get("task_type", "v2v")
    if not isinstance(task_type, str):
        raise _fail(source, "task_type", f"must be a string naming a task, got {json.dumps(task_type)[:80]}")
    try:
        return get_task(task_type)
    except ValueError as exc:
        raise _fail(source, "task_type", str(exc)) from None


def _mode_of(merged: Mapping[str, Any], source: str) -> str | None:
    mode = merged.get("guidance_mode")
    if mode is None:
        return None
    if not isinstance(mode, str):
        raise _fail(source, "guidance_mode", f"must be a string naming a mode, got {json.dumps(mode)[:80]}")
    try:
        get_mode(mode)
    except ValueError as exc:
        raise _fail(source, "guidance_mode", str(exc)) from None
    return mode


def _media_list(merged: Mapping[str, Any], key: str, source: str, base: Path | None, *, allow_single: bool) -> list[Path]:
    if merged.get(key) is None:
        return []
    return [_resolve_media(v, source, key, base) for v in _string_list(merged[key], source, key, allow_single)]


def _single_media(merged: Mapping[str, Any], key: str, source: str, base: Path | None) -> Path | None:
    value = merged.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _fail(source, key, f"must be one path string, got {json.dumps(value)[:80]}")
    return _resolve_media(value, source, key, base)


def check_task_inputs(case: Case) -> None:
    """The strict rule for interfaces that offer only a task's own inputs (the demo): the task's media counts.

    Case files and --inputs do not apply it: they take any media with any task, as upstream (plan.py warns).
    """
    task, source = case.task, case.source
    lo, hi = task.videos
    if not lo <= len(case.videos) <= hi:
        need = f"exactly {lo}" if lo == hi else f"{lo} to {hi}"
        raise _fail(source, "video", f"task {task.name!r} takes {need} video(s), got {len(case.videos)}")
    if case.image and not task.image:
        raise _fail(source, "image", f"task {task.name!r} takes no single source image (use 'images' for references)")
    if task.image and not case.image and task.name == "i2i":
        raise _fail(source, "image", "task 'i2i' needs the source image under 'image'")
    lo, hi = task.images
    if not lo <= len(case.images) <= hi:
        raise _fail(source, "images", f"task {task.name!r} takes {lo} to {hi} reference image(s), got {len(case.images)}")


def load_case_file(path: Path, *, name: str | None = None, defaults: Mapping[str, Any] | None = None) -> Case:
    source = str(path)
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaseError(f"{source}: case file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CaseError(f"{source}: not valid JSON ({exc})") from None
    return parse_case(data, source=source, name=name or path.stem, base=path.parent.resolve(), defaults=defaults)


def find_case_files(spec: str, output_dir: Path | None = None) -> list[Path]:
    """A case file, a folder of case files (recursive, sorted), or a glob.

    A folder or glob skips bernini's own files: sidecars, summaries, and everything under
    `output_dir` when that sits inside the searched folder (so a rerun never reads its outputs as cases).
    """
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        root, files, kind = path, sorted(p for p in path.rglob("*.json") if p.is_file()), "folder holds no *.json case files"
    elif glob.has_magic(spec):
        root, files, kind = _glob_root(spec), sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()), "glob matches no files"
    else:
        raise CaseError(f"{spec}: no such case file or folder")
    cases = [p for p in files if not _ours(p, root, output_dir)]
    if len(cases) < len(files):
        log.info("%s: skipped %d of bernini's own files (sidecars, summaries, files under --output_dir)", spec, len(files) - len(cases))
    if not cases:
        raise CaseError(f"{spec}: {kind}" + (f" besides {len(files)} of bernini's own outputs" if files else ""))
    return cases


def _glob_root(spec: str) -> Path:
    """The folder a glob searches: its leading parts without wildcards."""
    parts = Path(spec).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    return Path(*parts[:fixed]) if fixed else Path(".")


def _ours(path: Path, root: Path, output_dir: Path | None) -> bool:
    """A sidecar or summary.json we wrote, or a file under an --output_dir that lies inside the searched folder."""
    if output_dir is not None:
        out, top = output_dir.resolve(), root.resolve()
        if out != top and outputs.is_inside(out, top) and outputs.is_inside(path, out):
            return True
    return outputs.is_sidecar(path) or outputs.is_summary(path)


def load_inputs(path: Path, defaults: Mapping[str, Any]) -> list[tuple[Any, str]]:
    """--inputs: a JSON list of case objects, or JSONL (one per line) -> [(object, source)]."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CaseError(f"{path}: --inputs file not found") from None
    if path.suffix == ".jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((parse_json(line), f"{path}:{n}"))
                except json.JSONDecodeError as exc:
                    raise CaseError(f"{path}:{n}: not valid JSON ({exc})") from None
        return items
    try:
        data = parse_json(text)
    except json.JSONDecodeError as exc:
        raise CaseError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise CaseError(f"{path}: --inputs must hold a JSON list of case objects (or use .jsonl)")
    return [(item, f"{path}[{i}]") for i, item in enumerate(data)]


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Case names from file stems; a stem that repeats becomes its path below the common folder."""
    stems = [p.stem for p in paths]
    repeated = {s for s in stems if stems.count(s) > 1}
    if not repeated:
        return stems
    dupes = [p.resolve() for p in paths if p.stem in repeated]
    root = Path(os.path.commonpath([str(p.parent) for p in dupes]))
    return [p.resolve().with_suffix("").relative_to(root).as_posix() if p.stem in repeated else p.stem for p in paths]


@dataclass(frozen=True)
class BatchSpec:
    """Where cases come from (the input flags of the CLI)."""

    case: Sequence[str] = ()
    inputs: str | None = None
    cli_case: Mapping[str, Any] = field(default_factory=dict)  # --prompt/--task_type/--video/... values
    output: str | None = None  # --output when given explicitly
    output_dir: str = "outputs"
    overwrite: bool = False  # --overwrite: replace existing files bernini did not write
    confine_outputs: bool = False  # --confine_outputs: refuse outputs outside output_dir (demo, servers)


def collect_cases(spec: BatchSpec) -> tuple[list[Case], list[tuple[str, str]]]:
    """All cases of a batch -> (valid cases, [(source, error)]); outputs assigned and checked unique."""
    if spec.case and spec.inputs:
        raise CaseError("--case and --inputs cannot be combined; pick one source of cases")
    errors: list[tuple[str, str]] = []
    cases: list[Case] = []

    def attempt(fn: Callable[[], Case], source: str) -> None:
        try:
            cases.append(fn())
        except CaseError as exc:
            errors.append((source, str(exc)))

    if spec.case:
        files = find_all_case_files(spec.case, errors, Path(spec.output_dir))
        for path, name in zip(files, _unique_names(files), strict=True):
            attempt(lambda: load_case_file(path, name=name, defaults=spec.cli_case), str(path))
    elif spec.inputs:
        items = load_inputs(Path(spec.inputs), spec.cli_case)
        width = len(str(len(items)))
        for i, (item, source) in enumerate(items):
            name = f"{Path(spec.inputs).stem}_{i:0{width}d}"
            attempt(lambda: parse_case(item, source=source, name=name, base=Path(spec.inputs).parent.resolve(), defaults=spec.cli_case), source)
    else:
        attempt(lambda: parse_case({}, source="<command line>", name="output", base=None, defaults=spec.cli_case), "<command line>")
    if spec.output and len(cases) + len(errors) > 1:
        raise CaseError(f"--output names one file but the batch has {len(cases) + len(errors)} cases; use --output_dir, or 'output' in each case file")
    cases = assign_outputs(cases, spec, errors)
    return cases, errors


def find_all_case_files(specs: Sequence[str], errors: list[tuple[str, str]], output_dir: Path | None = None) -> list[Path]:
    """Every --case argument's files, each once; an argument that names nothing is an invalid entry."""
    found: dict[Path, Path] = {}
    for spec in specs:
        try:
            for path in find_case_files(spec, output_dir):
                found.setdefault(path.resolve(), path)  # a file named twice (folder + file) runs once
        except CaseError as exc:
            errors.append((spec, str(exc)))
    return list(found.values())


def _suffix_for(case: Case) -> str:
    return ".png" if case.task.single_frame else ".mp4"


def assign_outputs(cases: list[Case], spec: BatchSpec, errors: list[tuple[str, str]]) -> list[Case]:
    """Every case gets an output path of the right kind; collisions are errors, not overwrites."""
    resolved: list[Case] = []
    for case in cases:
        out = _output_for(case, spec, len(cases))
        if case.task.single_frame and out.suffix.lower() != ".png":
            log.info("%s: task %s renders one frame; writing %s", case.source, case.task_type, out.with_suffix(".png"))
            out = out.with_suffix(".png")
        if not case.task.single_frame and out.suffix.lower() != ".mp4":
            errors.append((case.source, f"{case.source}: key 'output': {out} must end in .mp4: task {case.task_type!r} renders a video (H.264 mp4)"))
            continue
        resolved.append(replace(case, output=out.resolve()))
    return _refuse_unsafe(_drop_collisions(resolved, errors), spec, errors)


def _refuse_unsafe(cases: list[Case], spec: BatchSpec, errors: list[tuple[str, str]]) -> list[Case]:
    """No output may replace an input of the batch, a foreign file (without --overwrite), or leave a confined folder."""
    extra = {Path(spec.inputs): f"the --inputs file {spec.inputs}"} if spec.inputs else {}
    protected = outputs.Protected({**outputs.protected_files(cases), **extra})
    confine_to = Path(spec.output_dir) if spec.confine_outputs else None
    safe = []
    for case in cases:
        problem = outputs.output_problem(case.output, protected, overwrite=spec.overwrite, confine_to=confine_to)  # type: ignore[arg-type]
        if problem:
            named_by = "key 'output'" if case.explicit_output else ("--output" if spec.output else "output from --output_dir")
            errors.append((case.source, f"{case.source}: {named_by}: {problem}"))
        else:
            safe.append(case)
    return safe


def _output_for(case: Case, spec: BatchSpec, count: int) -> Path:
    if case.output is not None and case.explicit_output:
        return case.output
    if spec.output and count == 1:
        return Path(spec.output)
    return Path(spec.output_dir) / f"{case.name}{_suffix_for(case)}"


def _drop_collisions(cases: list[Case], errors: list[tuple[str, str]]) -> list[Case]:
    """Explicit outputs that clash are all invalid (naming each other); derived ones get a suffix."""
    claims: dict[Path, list[Case]] = {}
    for case in cases:
        if case.explicit_output:
            claims.setdefault(case.output, []).append(case)  # type: ignore[arg-type]
    clashing = {path: group for path, group in claims.items() if len(group) > 1}
    for path, group in clashing.items():
        for case in group:
            others = ", ".join(o.source for o in group if o is not case)
            errors.append((case.source, f"{case.source}: key 'output': {path} is also the output of {others}; give each case its own output"))
    taken = set(claims)
    unique: list[Case] = []
    for case in cases:
        if case.explicit_output:
            if case.output not in clashing:
                unique.append(case)
            continue
        out = _free_name(case.output, taken)  # type: ignore[arg-type]
        if out != case.output:
            log.warning("%s: output %s is taken by another case; writing %s", case.source, case.output, out)
        taken.add(out)
        unique.append(replace(case, output=out))
    return unique


def _free_name(path: Path, taken: set[Path]) -> Path:
    n = 2
    candidate = path
    while candidate in taken:
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        n += 1
    return candidate


def resolve_mode(case: Case, cli_mode: str | None) -> str:
    """Case file first, then --guidance_mode, then the task's default (upstream: always rv2v)."""
    return case.guidance_mode or cli_mode or case.task.default_mode

