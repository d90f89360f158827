"""`standin app`: a local web app (Gradio) around one loaded Stand-In pipeline.

    standin app                                   # the embedded mini model, offline, http://127.0.0.1:7860
    standin app --base ./Wan2.1-T2V-14B-Diffusers --adapter Stand-In_wan2.1_T2V_14B_ver1.0.ckpt

Upload a reference photo (the reference as the model will see it appears beside it, with the reason when face
preprocessing fell back to the whole image), write a prompt, pick a size preset that fits the loaded base (from
its config: default_height, default_width, default_num_frames, default_fps), and generate: a progress bar moves
per denoising step, Cancel stops at the next step. The video plays and downloads; every result of the session
stays in a gallery with its settings and its scores (FaceSim with the base's face backend, face rate, motion).

The model loads once, before the server starts, and is shared by all requests through a queue that runs one
generation at a time. The server listens on 127.0.0.1 unless --host says otherwise; a public share link is
made only with --share. Nothing is downloaded at run time: Gradio's analytics are off and the page uses system
fonts. Every video goes through standin.video.save_video: watermarked and labelled as generated.

Importing this module is cheap: gradio, torch and diffusers are imported when the app is built.
"""

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

MAX_SEED = 2**31 - 1
SIZE_STEP = 16  # Wan: VAE stride 8 x patch 2
MAX_SIDE = 1920
MAX_FRAMES = 257


class GenerationCancelled(Exception):
    pass


# ---- the model -------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    pipe: object
    base: str
    adapter: str | None
    adapter_low: str | None
    face_backend: str | None  # standin.faces.get_backend name; None: dlib, the default for real photos
    is_default: bool
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def config(self):
        return self.pipe.config


def load_model(base=None, adapter=None, adapter_low=None, device=None, face_backend=None) -> LoadedModel:
    import torch

    from standin.commands import default_model
    from standin.loading import load_pipeline

    is_default = base is None
    if is_default:
        if adapter is not None or adapter_low is not None:
            raise ValueError("--adapter and --adapter-low need --base (the default model brings its own adapter)")
        model = default_model()
        base, adapter = model["base"], model["adapter"]
        face_backend = face_backend or "mini"
    if adapter is None:
        raise ValueError("the app generates from a reference: give the Stand-In --adapter of --base")
    dtype = torch.float32 if is_default else None
    pipe = load_pipeline(base, adapter, adapter_low, device=device, dtype=dtype)
    return LoadedModel(pipe, str(base), str(adapter), None if adapter_low is None else str(adapter_low),
                       face_backend, is_default)


def size_presets(config) -> dict[str, tuple[int, int, int]]:
    """Name -> (width, height, frames) presets that fit a base: its own default, the portrait of it, and a
    shorter clip (about half the frames, still 4k+1)."""
    width, height, frames = config.default_width, config.default_height, config.default_num_frames
    short = max(5, ((frames - 1) // 2) // 4 * 4 + 1)
    presets = {f"{width}x{height}, {frames} frames (the base's default)": (width, height, frames)}
    if width != height:
        presets[f"{height}x{width}, {frames} frames (portrait)"] = (height, width, frames)
    if short != frames:
        presets[f"{width}x{height}, {short} frames (shorter)"] = (width, height, short)
    return presets


def size_problem(width, height, frames) -> str | None:
    """Why a size cannot be generated, in words, or None."""
    for name, value in (("width", width), ("height", height), ("frames", frames)):
        if value is None or value != value or float(value) != int(value):
            return f"{name} must be a whole number, got {value}"
    width, height, frames = int(width), int(height), int(frames)
    for name, value in (("width", width), ("height", height)):
        if not SIZE_STEP <= value <= MAX_SIDE or value % SIZE_STEP:
            return (f"impossible size: the {name} must be a multiple of {SIZE_STEP} between {SIZE_STEP} and "
                    f"{MAX_SIDE} px, got {value}")
    if not 1 <= frames <= MAX_FRAMES or (frames - 1) % 4:
        return f"impossible length: frames must be 4k+1 (1, 5, 9, ... {MAX_FRAMES}), got {frames}"
    return None


# ---- one generation ----------------------------------------------------------------------------------------
def prepare_reference(model: LoadedModel, path):
    """(the reference the model will see as a PIL image, a sentence on how it was made)."""
    from standin.preprocess import load_image, preprocess_reference

    size = model.config.reference_size
    if model.config.preprocess_reference:
        result = preprocess_reference(path, size=size)
        note = result.describe() if result.fallback_reason is None else (
            f"Face preprocessing fell back to the whole image: {result.fallback_reason}")
        return result.image, note
    load_image(path)  # a readable image, or ImageLoadError with the reason
    image = model.pipe.prepare_reference_image(path, preprocess=False)
    return image, ("This base takes references as they are (its config says preprocess_reference=false): "
                   "only padded to a square and resized.")


def evaluate(video: Path, reference: Path, backend) -> dict:
    from standin.eval.metrics import NoFaceError, evaluate_video

    try:
        scores = evaluate_video(video, reference, backend=backend).to_dict()
    except NoFaceError as error:
        from standin.eval.metrics import motion_amplitude

        return {"face_sim": None, "face_rate": None, "motion": motion_amplitude(video), "note": str(error)}
    return {key: scores[key] for key in ("face_sim", "face_rate", "motion", "backend")}


def describe_scores(scores: dict) -> str:
    def number(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    text = (f"FaceSim {number(scores.get('face_sim'))} (face in {number(scores.get('face_rate'), 2)} of the "
            f"frames read), motion {number(scores.get('motion'))}% of the diagonal per frame")
    if scores.get("backend"):
        text += f"; face backend {scores['backend']}"
    if scores.get("note"):
        text += f". {scores['note']}"
    return text


def generate_video(model: LoadedModel, output_dir: Path, reference, prompt, negative_prompt, steps, guidance,
                   seed, width, height, frames, on_step=None, cancelled=None) -> dict:
    """Generate one video; returns its record (paths, settings, scores). ValueError for bad input."""
    import torch

    from standin.io import save_image
    from standin.provenance import generation_provenance
    from standin.video import companion_paths, save_video

    if not reference:
        raise ValueError("upload a reference photo first")
    if not prompt or not str(prompt).strip():
        raise ValueError("write a prompt: what should the person do, where?")
    problem = size_problem(width, height, frames)
    if problem:
        raise ValueError(problem)
    if steps is None or not 1 <= int(steps) <= 200:
        raise ValueError(f"steps must be between 1 and 200, got {steps}")
    if guidance is None or not 0 <= float(guidance) <= 30:
        raise ValueError(f"guidance must be between 0 and 30, got {guidance}")
    width, height, frames, steps, seed = int(width), int(height), int(frames), int(steps), int(seed)
    image, note = prepare_reference(model, reference)

    def step_end(pipe, index, timestep, tensors):
        if cancelled is not None and cancelled():
            raise GenerationCancelled("cancelled")
        if on_step is not None:
            on_step(index + 1, steps)
        return {}

    extra = {} if not negative_prompt or not str(negative_prompt).strip() else {"negative_prompt": negative_prompt}
    started = time.perf_counter()
    with model.lock:  # one generation at a time on the one model, whoever calls (UI queue or API)
        result = model.pipe(
            prompt=str(prompt).strip(), reference_image=image, preprocess_reference=False,
            num_inference_steps=steps, guidance_scale=float(guidance),
            generator=torch.Generator().manual_seed(seed), height=height, width=width, num_frames=frames,
            callback_on_step_end=step_end, **extra,
        )
    seconds = time.perf_counter() - started
    output_dir.mkdir(parents=True, exist_ok=True)
    number = len(list(output_dir.glob("*.mp4"))) + 1
    video = output_dir / f"{number:03d}_seed{seed}.mp4"
    reference_path, sheet_path = companion_paths(video)
    record = generation_provenance(base=model.base, adapter=model.adapter, adapter_low=model.adapter_low,
                                   seed=seed, prompt=str(prompt).strip(), steps=steps, guidance=float(guidance))
    fps = int(model.config.default_fps)
    save_video(result.frames[0], video, fps=fps, provenance=record)
    save_image(result.reference if result.reference is not None else image, reference_path)
    scores = evaluate(video, reference_path, model.face_backend)
    settings = {"prompt": str(prompt).strip(), "negative_prompt": extra.get("negative_prompt"), "steps": steps,
                "guidance": float(guidance), "seed": seed, "width": width, "height": height, "frames": frames,
                "fps": fps, "seconds": round(seconds, 1)}
    return {"video": str(video), "reference": str(reference_path), "reference_note": note,
            "settings": settings, "scores": scores}


def describe_settings(settings: dict) -> str:
    return (f"\"{settings['prompt']}\" | seed {settings['seed']}, {settings['steps']} steps, guidance "
            f"{settings['guidance']:g}, {settings['width']}x{settings['height']}, {settings['frames']} frames "
            f"at {settings['fps']} fps, {settings['seconds']} s")


# ---- the web app -------------------------------------------------------------------------------------------
def build_app(model: LoadedModel, output_dir: Path):
    """The Gradio Blocks of the app (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from standin.video import VideoWriteError

    presets = size_presets(model.config)
    first = next(iter(presets))
    cancel_flags: dict[str, threading.Event] = {}

    def flag(request) -> threading.Event:
        key = getattr(request, "session_hash", None) or "api"
        return cancel_flags.setdefault(key, threading.Event())

    def preview(reference):
        from standin.preprocess import load_image

        if not reference:
            return None, None, ""
        try:
            photo = load_image(reference)
            image, note = prepare_reference(model, reference)
        except (OSError, ValueError) as error:
            message = str(error).replace(str(reference), Path(reference).name)  # not the server's temp path
            return None, None, f"**This file cannot be used as a reference:** {message}"
        return photo, image, note

    def choose_preset(name):
        width, height, frames = presets.get(name, presets[first])
        return width, height, frames

    def run(reference, prompt, negative_prompt, steps, guidance, random_seed, seed, width, height, frames,
            history, request: gr.Request, progress=gr.Progress()):
        seed = random.randint(0, MAX_SEED) if random_seed or seed is None or seed < 0 else int(seed)
        event = flag(request)
        event.clear()
        progress((0, int(steps or 1)), desc="denoising", unit="steps")
        try:
            record = generate_video(
                model, output_dir, reference, prompt, negative_prompt, steps, guidance, seed, width, height,
                frames, on_step=lambda done, total: progress((done, total), desc="denoising", unit="steps"),
                cancelled=event.is_set,
            )
        except GenerationCancelled:
            raise gr.Error("Generation cancelled.", title="Cancelled")
        except (OSError, ValueError, VideoWriteError) as error:
            raise gr.Error(str(error), title="Cannot generate")
        history = [*(history or []), record]
        caption = f"{describe_settings(record['settings'])} | {describe_scores(record['scores'])}"
        gallery = [(item["video"], f"{describe_settings(item['settings'])} | {describe_scores(item['scores'])}")
                   for item in reversed(history)]
        table = [[Path(item["video"]).name, item["settings"]["prompt"], item["settings"]["seed"],
                  item["settings"]["steps"], item["settings"]["guidance"],
                  f"{item['settings']['width']}x{item['settings']['height']}x{item['settings']['frames']}",
                  item["scores"].get("face_sim"), item["scores"].get("motion")] for item in reversed(history)]
        return (record["video"], record["video"], f"**Settings:** {describe_settings(record['settings'])}\n\n"
                f"**Scores:** {describe_scores(record['scores'])}", seed, gallery, table, history, caption)

    def cancel(request: gr.Request):
        flag(request).set()
        return "Cancelling at the next denoising step..."

    title = "Stand-In: a video of the person in your photo"
    with gr.Blocks(title="standin", analytics_enabled=False) as app:
        gr.Markdown(f"# {title}\nModel: `{model.base}` with adapter `{Path(model.adapter).name}`"
                    + (" (the embedded mini model: prompts like \"A woman waves on a beach at noon.\", references "
                       "like examples/*.png)" if model.is_default else "")
                    + ". Every video is marked as AI-generated (invisible watermark and metadata).")
        history = gr.State([])
        with gr.Row():
            with gr.Column():
                # A file input, not gr.Image: a file that is not an image reaches our check, which says why.
                reference = gr.File(label="Reference photo (upload)", file_types=["image"], type="filepath",
                                    elem_id="reference", height=120)
                with gr.Row():
                    uploaded = gr.Image(label="Your photo", interactive=False, elem_id="uploaded", height=256)
                    prepared = gr.Image(label="What the model sees", interactive=False, elem_id="prepared",
                                        height=256)
                reference_note = gr.Markdown(elem_id="reference-note")
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    placeholder="A woman waves on a beach at noon." if model.is_default else
                                    "a man plays the guitar in a park")
                negative = gr.Textbox(label="Negative prompt (empty: Wan's standard one)", lines=1,
                                      elem_id="negative")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(0, 15, value=model.config.default_guidance_scale, step=0.5,
                                         label="Guidance", elem_id="guidance")
                with gr.Row():
                    random_seed = gr.Checkbox(value=True, label="Random seed", elem_id="random-seed")
                    seed = gr.Number(value=0, precision=0, label="Seed (the one used is shown here)",
                                     elem_id="seed")
                preset = gr.Dropdown(list(presets), value=first, label="Size preset", elem_id="preset")
                with gr.Row():
                    width = gr.Number(value=presets[first][0], precision=0, label="Width", elem_id="width")
                    height = gr.Number(value=presets[first][1], precision=0, label="Height", elem_id="height")
                    frames = gr.Number(value=presets[first][2], precision=0, label="Frames (4k+1)",
                                       elem_id="frames")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", elem_id="cancel")
            with gr.Column():
                video = gr.Video(label="Result", elem_id="result", interactive=False)
                download = gr.File(label="Download", elem_id="download", interactive=False)
                info = gr.Markdown(elem_id="result-info")
                status = gr.Markdown(elem_id="status")
        gr.Markdown("## This session's results")
        gallery = gr.Gallery(label="Results", columns=6, height=240, object_fit="contain", elem_id="gallery",
                             show_label=False)
        table = gr.Dataframe(headers=["file", "prompt", "seed", "steps", "guidance", "size", "FaceSim", "motion"],
                             interactive=False, elem_id="results-table", wrap=True)
        caption = gr.Textbox(visible=False)

        reference.change(preview, reference, [uploaded, prepared, reference_note], concurrency_limit=None,
                         api_name="preview")
        preset.change(choose_preset, preset, [width, height, frames], queue=False, api_name=False)
        job = go.click(run, [reference, prompt, negative, steps, guidance, random_seed, seed, width, height, frames,
                             history], [video, download, info, seed, gallery, table, history, caption],
                       api_name="generate", concurrency_limit=1, concurrency_id="generate")
        stop.click(cancel, None, status, cancels=[job], queue=False, api_name=False)
    return app


def launch(app, host: str = "127.0.0.1", port: int | None = None, share: bool = False, output_dir=None,
           block: bool = True):
    import gradio as gr

    app.queue(default_concurrency_limit=1, max_size=32)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return app.launch(server_name=host, server_port=port, share=share, inbrowser=False, ssr_mode=False,
                      show_error=True, prevent_thread_lock=not block, theme=theme, quiet=not block,
                      allowed_paths=[str(output_dir)] if output_dir else None, footer_links=["api"])


# ---- command line --------------------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "app", help="a local web app: reference photo + prompt -> video, in the browser",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--base", help="Wan diffusers folder, original Wan folder or hub id (default: the "
                        "installed mini model)")
    parser.add_argument("--adapter", help="Stand-In adapter of --base (.ckpt / .safetensors); Wan2.2: *_high")
    parser.add_argument("--adapter-low", help="Wan2.2 only: the *_low adapter")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--face-backend", help="face backend for the scores (default: mini for the mini model, "
                        "dlib otherwise; or an insightface pack folder / ArcFace .onnx)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by "
                        "default; needs internet)")
    parser.add_argument("--output-dir", help="where videos are written (default: a new temporary folder)")
    parser.set_defaults(func=run_app)


def run_app(args) -> int:
    if not 0 < args.port < 65536:
        print(f"error: --port must be between 1 and 65535, got {args.port}", file=sys.stderr)
        return 1
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the app needs gradio: pip install 'standin[app]'", file=sys.stderr)
        return 1
    output_dir = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="standin-app-"))
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        model = load_model(args.base, args.adapter, args.adapter_low, args.device, args.face_backend)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"videos are written to {output_dir}", file=sys.stderr)
    launch(build_app(model, output_dir), args.host, args.port, args.share, output_dir)
    return 0
