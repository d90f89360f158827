"""`standin generate --jobs FILE`: many videos from one model load per process, shared out over the processes of
`accelerate launch` or `torchrun` (one machine or several), resumable.

FILE is JSON Lines: one video per line, {"prompt": ..., "output": "out/a.mp4"} and any of the other
VIDEO_SETTINGS of standin.commands (reference: a path or a list of paths, seed, negative_prompt, height, width,
frames, steps, guidance, reference_guidance, reference_guidance_steps, fps); the flags give the defaults. Paths
are relative to the folder of FILE, so a jobs file and its references can move together. The whole file is
checked before the model loads; a bad line is a one-line error naming it, and nothing is written.

Video i (in file order, blank lines not counted) goes to process i % number of processes: each video's noise comes
from its own seed, so the union of the outputs is the same for any number of processes. A video whose .mp4 and
companion files all exist is skipped: the .mp4 is written last and atomically, so it exists only once the video
is finished, and a killed run loses only the videos in flight. A video that fails (a missing reference, a size
the pipeline refuses, out of memory) is recorded with its reason and the others go on. At the end rank 0 prints
a summary and writes every video's outcome to NAME.summary.json beside NAME.jsonl.
"""

import json
import time
from datetime import timedelta
from pathlib import Path

from standin.cli import fail
from standin.commands import (VIDEO_SETTINGS, check_outputs, default_model, flags_problem,
                              generate_video, load_generator, output_paths, parse_loras, setting_problem)

# The value type of each key a line may have: the VIDEO_SETTINGS.
JOB_KEYS = {"prompt": str, "output": str, "reference": list, "negative_prompt": str, "seed": int, "height": int,
            "width": int, "frames": int, "steps": int, "guidance": float, "reference_guidance": float,
            "reference_guidance_steps": int, "fps": int}
# Processes that finish their share early wait for the others at the summary: allow them days, not the default
# 10 to 30 minutes of a collective.
SUMMARY_TIMEOUT = timedelta(days=7)


class JobsFileError(ValueError):
    """A jobs file that cannot be run as it is; the message names the line."""


def value_problem(key: str, value) -> str | None:
    """Why a line's value for `key` cannot be used, or None."""
    kind = JOB_KEYS[key]
    if key == "reference":
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list) or not all(isinstance(path, str) and path for path in paths):
            return "must be a path or a list of paths"
        return None
    if kind is str and not isinstance(value, str):
        return "must be a string"
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        return f"must be a whole number, got {json.dumps(value)}"
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"must be a number, got {json.dumps(value)}"
    if key in ("prompt", "output") and not value.strip():
        return "must not be empty"
    if key == "output" and Path(value).suffix.lower() != ".mp4":
        return f"must be an .mp4 file, got {value}"
    return setting_problem(key, value)


def video_files(job: dict) -> list[Path]:
    """Every file a job writes, its .mp4 last (the order generate_video writes them in)."""
    references, sheet = output_paths(job["output"], len(job["reference"]))
    return [*references, sheet, job["output"]]


def read_jobs(path: str | Path) -> list[dict]:
    """The jobs of a jobs file: each line's keys checked, "line" (its number in the file) added, "reference" a list
    of paths (empty without one), paths resolved against the file's folder. JobsFileError if any line is wrong."""
    from standin.io import regular_file_problem

    path = Path(path)
    problem = regular_file_problem(path, "jobs file")
    if problem:
        raise JobsFileError(f"{path}: {problem}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise JobsFileError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    jobs, writers, readers = [], {}, {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            job = json.loads(line)
        except json.JSONDecodeError as error:
            raise JobsFileError(f"{where}: not JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(job, dict):
            raise JobsFileError(f'{where}: a job is a JSON object, e.g. {{"prompt": "...", "output": "a.mp4"}}')
        for key in job:
            if key not in JOB_KEYS:
                raise JobsFileError(f"{where}: unknown key {key!r} (known: {', '.join(JOB_KEYS)})")
        for key in ("prompt", "output"):
            if key not in job:
                raise JobsFileError(f"{where}: no {key!r}: every line needs a prompt and an output")
        for key, value in job.items():
            problem = value_problem(key, value)
            if problem:
                raise JobsFileError(f"{where}: {key} {problem}")
        references = job.get("reference", [])
        job["reference"] = [str(path.parent / Path(p).expanduser()) for p in
                            ([references] if isinstance(references, str) else references)]
        job["output"] = path.parent / Path(job["output"]).expanduser()
        job["line"] = number
        # Two lines writing one file, or one line's output replacing another's reference, would lose a video.
        for file in reversed(video_files(job)):  # the .mp4 first: the clash to name when two outputs are one
            other = writers.setdefault(file.resolve(), number)
            if other != number:
                raise JobsFileError(f"{where}: {file} is also written by line {other}: give each video its own output")
        for reference in job["reference"]:
            readers.setdefault(Path(reference).resolve(), number)
        jobs.append(job)
    for file, number in writers.items():
        if file in readers:
            raise JobsFileError(f"{path} line {number}: {file} would overwrite the reference of line {readers[file]}")
    if not jobs:
        raise JobsFileError(f'{path}: no jobs in it (one JSON object per line, e.g. {{"prompt": "...", "output": '
                            f'"a.mp4"}})')
    return jobs


def summary_path(jobs_file: str | Path) -> Path:
    """Where a run's summary goes: jobs.jsonl -> jobs.summary.json beside it."""
    return Path(jobs_file).with_suffix(".summary.json")


def failure_reason(error: Exception) -> str:
    """One line: the message of an expected error (bad input), with its type for anything else."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, (OSError, ValueError)) else f"{type(error).__name__}: {text}"


def run_job(pipe, video: dict, args, model: dict) -> dict:
    """Make one video unless an earlier run finished it; its outcome: status done, skipped or failed (with the
    reason)."""
    from standin.io import regular_file_problem, stale_temporaries

    files = video_files(video)
    outcome = {"line": video["line"], "output": str(video["output"])}
    # Finished: every file there. The .mp4 is written last, but a companion may have been deleted since.
    if all(file.is_file() for file in files):
        return {**outcome, "status": "skipped"}
    started = time.perf_counter()
    try:
        for reference in video["reference"]:
            problem = regular_file_problem(reference, "reference image")
            if problem:
                raise FileNotFoundError(f"{reference}: {problem}")
        for file in files:  # what a killed run left half-written (only this process writes this job's files)
            for temporary in stale_temporaries(file):
                temporary.unlink(missing_ok=True)
        generate_video(pipe, video, args, model)
    except Exception as error:  # whatever one video meets, the others are still made
        return {**outcome, "status": "failed", "reason": failure_reason(error)}
    return {**outcome, "status": "done", "seconds": round(time.perf_counter() - started, 2)}


def count(results: list[dict]) -> dict[str, int]:
    return {status: sum(result["status"] == status for result in results) for status in ("done", "skipped", "failed")}


def print_summary(results: list[dict], processes: int, path: Path) -> None:
    """The table at the end of a run: how many videos were made, skipped and failed, and why each failed."""
    print(f"{len(results)} videos, {processes} process{'es' * (processes > 1)}")
    for status, number in count(results).items():
        print(f"  {status:<8}{number:>6}")
    for result in results:
        if result["status"] == "failed":
            print(f"  failed: line {result['line']} ({result['output']}): {result['reason']}")
    print(f"every video's outcome: {path}")


def run_jobs(args) -> int:
    """`standin generate --jobs FILE`."""
    for flag, name in (("--prompt", "prompt"), ("-o", "output"), ("--reference", "reference")):
        if getattr(args, name) is not None:
            return fail(f"{flag} goes in the jobs file with --jobs: each line has its own {name}")
    if args.control is not None or args.control_reference:
        return fail("--control and --control-reference are not available with --jobs")
    if args.parallel:
        return fail("--parallel is not available with --jobs: the videos are shared out over the processes instead")
    problem = flags_problem(args)
    if problem:
        return fail(problem)

    from standin.checkpoint import AdapterFileError
    from standin.io import check_writable
    from standin.lora import LoraFileError

    summary = summary_path(args.jobs)
    try:
        loras, loras_low = parse_loras(args)
        jobs = read_jobs(args.jobs)
        base, adapter, adapter_low = args.base, args.adapter, args.adapter_low
        with_reference = [job["line"] for job in jobs if job["reference"]]
        if base is None:
            model = default_model()
            base = model["base"]
            # Loaded when any video has a reference; a video without one is then still exactly the base's.
            adapter = model["adapter"] if with_reference else None
        elif with_reference and adapter is None:
            raise JobsFileError(f"{args.jobs} line {with_reference[0]}: a reference needs the Stand-In --adapter of "
                                f"--base")
        inputs = [("adapter", adapter), ("adapter", adapter_low), *(("LoRA", path) for path, _ in loras + loras_low)]
        for job in jobs:
            try:
                check_outputs(video_files(job), [*(("reference", r) for r in job["reference"]), *inputs])
            except (OSError, ValueError) as error:
                raise JobsFileError(f"{args.jobs} line {job['line']}: {error}") from None
        check_writable(summary)
    except (OSError, ValueError) as error:  # OSError: NoDefaultModelError too
        return fail(str(error))

    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    # cpu=True without a GPU: accelerate leaves CPU processes of torchrun / accelerate launch unconnected otherwise.
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available(), timeout=SUMMARY_TIMEOUT)
    if args.device not in (None, "cpu") and state.num_processes > 1:
        return fail("--device is for one process: under a launcher each process takes its own GPU")
    # Plain "cpu", not the "cpu:0" accelerate names under a launcher: moving the weights there would copy them to
    # other memory, and CPU matrix products may round differently with the alignment of their operands, so a
    # video would differ in its last bits from a one-process run's.
    device = args.device or ("cpu" if state.device.type == "cpu" else state.device)
    try:
        pipe, steps, guidance = load_generator(args, base, adapter, adapter_low, loras, loras_low, device)
    except (OSError, ValueError, AdapterFileError, LoraFileError) as error:
        return fail(str(error))
    pipe.set_progress_bar_config(disable=True)  # one bar per process, over its videos, instead
    defaults = {**{name: getattr(args, name) for name in VIDEO_SETTINGS}, "steps": steps, "guidance": guidance}
    model = {"base": base, "adapter": adapter, "adapter_low": adapter_low}

    mine = jobs[state.process_index::state.num_processes]
    results = []
    bar = tqdm(mine, desc=f"process {state.process_index}", position=state.process_index, unit="video")
    for job in bar:
        results.append({**run_job(pipe, {**defaults, **job}, args, model), "process": state.process_index})
        bar.set_postfix(count(results))
    bar.close()

    results = sorted(gather_object(results), key=lambda result: result["line"])
    status = 1 if any(result["status"] == "failed" for result in results) else 0
    if state.is_main_process:
        from standin.io import save_text

        print_summary(results, state.num_processes, summary)
        try:
            save_text(json.dumps({"jobs": str(args.jobs), "processes": state.num_processes, **count(results),
                                  "results": results}, indent=1) + "\n", summary)
        except OSError as error:  # the videos are written; still meet the others at the barrier
            status = fail(f"the summary could not be written: {error}")
    # A launcher stops the other processes when one exits with an error: the others wait for rank 0's summary.
    state.wait_for_everyone()
    return status
