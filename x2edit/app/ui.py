"""The Gradio page of ``x2edit app``: layout and wiring, over the handlers of ``x2edit.app.handlers``.

Two columns (source, instruction, task, Run and the settings on the left; a before/after slider,
download and "use as input" on the right), a history of the session's edits below them, a LoRA
search panel and a batch tab. The edit is the API endpoint ``/edit`` (also ``/edit_batch``,
``/classify``, ``/search_loras``), callable from ``gradio_client``.

Why the edit and batch events take their inputs unprocessed (``preprocess=False``): ``gr.Image``
decodes an upload before any handler or validator runs, so a corrupt file would end as a bare
"Error"; unprocessed, the handler reads the uploaded file itself and says what is wrong with it.
"""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path

import gradio as gr

from x2edit.app.examples import render_examples
from x2edit.app.handlers import (
    AUTO_TASK,
    BASE_OWN_ADAPTER,
    FUSION_CHOICES,
    INDEX_HELP,
    AppConfig,
    Editor,
    EditRecord,
    default_fusion,
    parse_file_size,
)
from x2edit.tasks import TASK_NAMES

LORA_HEADERS = ["use", "weight", "title", "score", "file"]
ONE_STEP_INFO = "this model edits in one step from the source; more steps help added LoRAs, not its own edit"
EDIT_CONCURRENCY = "model"  # edit and batch share it: one model, one edit at a time
THEME_FONTS = {"font": ["ui-sans-serif", "system-ui", "sans-serif"], "font_mono": ["ui-monospace", "monospace"]}
# Small images (Shape World is 64x64) are shown enlarged and sharp.
CSS = ("#result img, #source img, #history img { image-rendering: pixelated; }\n"
       "#source img { min-height: 240px; object-fit: contain; }")


def user_errors(fn):
    """Turn the handlers' ``ValueError`` / ``FileNotFoundError`` into a message for the user
    (a toast in the page, the error text in ``gradio_client``); other exceptions are bugs and stay."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e), print_exception=False) from None

    return wrapper


# -- raw (unprocessed) event inputs -> handler arguments ------------------------------------------
def file_path(value) -> str | None:
    """The path of an unprocessed file payload (a FileData dict or a plain path)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("path")
    raise ValueError(f"expected an uploaded file, got {type(value).__name__}")


def picked_loras(value) -> list[tuple[str, float]]:
    """[(file, weight)] of the rows ticked "use" in the LoRA table (a raw payload or a list of rows)."""
    rows = value.get("data", []) if isinstance(value, dict) else (value or [])
    picked = []
    for row in rows:
        use, weight, _, _, file = row
        if use in (True, "true", "True") and file:
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise ValueError(f"the weight of {Path(file).name} must be a number, got {weight!r}") from None
            picked.append((file, weight))
    return picked


def number(value, what: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None


def summary(record: EditRecord) -> str:
    """One paragraph under the result: where the instruction was routed and with what settings."""
    s = record.settings
    if record.task_choice == AUTO_TASK:
        p = record.scores.get(record.task)
        routed = f"**Task:** `{record.task}` (classifier, {100 * p:.0f}%)" if p is not None else \
            f"**Task:** `{record.task}` (classifier)"
    else:
        routed = f"**Task:** `{record.task}` (chosen by you)"
    loras = ", ".join(f"{name} x{w:g}" for name, w in s["loras"])
    mode = f" ({s['mode']})" if s.get("mode") in ("diptych", "incontext") else ""
    return (f"{routed} · base `{s['base']}`{mode} · adapter: {s['adapter']} · {s['steps']} step(s) · guidance "
            f"{s['guidance']:g} · seed {s['seed']} · {s['size'][0]}x{s['size'][1]} · {record.seconds:.1f} s"
            + (f"  \n**LoRAs** ({s['fusion']}): {loras}" if loras else ""))


def gallery_items(history: list[dict]) -> list[tuple[str, str]]:
    return [(h["result"], f"{i + 1}. {h['task']}: {h['instruction']}") for i, h in enumerate(history)]


def build_ui(editor: Editor, examples: list[list[str]]) -> gr.Blocks:
    """The page for ``editor``; ``examples`` are (image, instruction) pairs shown under the input."""
    fusion_default = default_fusion()
    steps_default, from_source = editor.steps_setting()

    def edit(image, instruction, task, steps, guidance, seed, random_seed, base, adapter, loras, fusion, history,
             mode=None, caption=None, progress=gr.Progress()):
        record = editor.edit(file_path(image), instruction, task or AUTO_TASK, number(steps, "steps"),
                             number(guidance, "guidance"), None if random_seed else number(seed, "the seed"),
                             base, adapter, picked_loras(loras), fusion, progress=progress, mode=mode, caption=caption)
        history = [*(history or []), record.to_dict()]
        return ((record.before, record.result), record.scores or record.task, summary(record), record.result,
                gallery_items(history), history, record.settings["seed"])

    def edit_batch(files, instruction, task, steps, guidance, seed, random_seed, base, adapter, loras, fusion,
                   history, mode=None, caption=None, progress=gr.Progress()):
        paths = [file_path(f) for f in (files or [])]
        records, archive = editor.edit_batch(paths, instruction, task or AUTO_TASK, number(steps, "steps"),
                                             number(guidance, "guidance"),
                                             None if random_seed else number(seed, "the seed"), base, adapter,
                                             picked_loras(loras), fusion, progress=progress, mode=mode,
                                             caption=caption)
        history = [*(history or []), *(r.to_dict() for r in records)]
        return ([(r.result, f"{r.task}: {Path(p).name}") for r, p in zip(records, paths)], str(archive),
                gallery_items(history), history)

    def search(query, instruction):
        hits = editor.search_loras(query if query and query.strip() else instruction)
        return [[False, 1.0, h["title"], round(h["score"], 3), h["file"]] for h in hits]

    def reload(history, evt: gr.SelectData):
        """A history entry back into the panels: source, instruction, task, settings and result."""
        h = history[evt.index]
        s = h["settings"]
        return (h["source"], h["instruction"], h["task_choice"], s["steps"], s["guidance"], s["seed"], False,
                gr.update(choices=editor.base_choices(s["mode"]), value=s["base"]), s["adapter"], (h["before"], h["result"]), h["scores"] or h["task"],
                summary(EditRecord(**h)), h["result"], s["mode"], gr.update(value=s["caption"] or "",
                                                                           visible=s["mode"] == "incontext"))

    def use_as_input(shown):
        """The result on the slider (the last edit, or a history entry reloaded) becomes the source."""
        if not shown or not shown[1]:
            raise gr.Error("there is no result yet: run an edit first", print_exception=False)
        return shown[1]

    def mode_changed(mode, current):
        """The base list of the chosen editing mode with the current base kept if it runs the mode (else the
        app's default, else the first), and the set's caption box, shown in the incontext mode only."""
        names = editor.base_choices(mode)
        value = current if current in names else editor.default_base if editor.default_base in names else names[0]
        return gr.update(choices=names, value=value), gr.update(visible=mode == "incontext")

    def model_changed(base, adapter):
        value, from_source = editor.steps_setting(base, adapter)
        return gr.update(value=value, info=ONE_STEP_INFO if from_source else None)

    with gr.Blocks(title="x2edit", analytics_enabled=False) as demo:
        history = gr.State([])
        gr.Markdown("## x2edit: edit an image with an instruction\nPick an example or upload an image, say what to "
                    "change, and press Run (or Enter).")
        with gr.Tab("Edit"):
            with gr.Row(equal_height=False):
                with gr.Column():
                    source = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], format="png",
                                      height=280, elem_id="source")
                    instruction = gr.Textbox(label="Instruction", placeholder="e.g. make the square red",
                                             elem_id="instruction")
                    caption = gr.Textbox(label="Set caption (incontext)", visible=editor.default_mode == "incontext",
                                         elem_id="caption",
                                         placeholder="[EDIT] make the square red [LEFT] a blue square on white "
                                                     "[RIGHT] a red square on white",
                                         info="the 2-panel set [source | result] in IC-LoRA's form: a task tag, then "
                                              "each panel after its position tag")
                    with gr.Row():
                        task = gr.Dropdown([AUTO_TASK, *TASK_NAMES], value=AUTO_TASK, label="Task (auto: classifier)",
                                           elem_id="task")
                        run = gr.Button("Run", variant="primary", elem_id="run")
                    task_label = gr.Label(label="Task the instruction is routed to", num_top_classes=3,
                                          elem_id="task-label")
                    with gr.Accordion("Advanced", open=False):
                        steps = gr.Slider(1, 50, value=steps_default, step=1, label="Steps",
                                          info=ONE_STEP_INFO if from_source else None, elem_id="steps")
                        guidance = gr.Slider(0.0, 10.0, value=editor.config.guidance, step=0.1, label="Guidance")
                        with gr.Row():
                            seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="seed")
                            random_seed = gr.Checkbox(False, label="Random seed")
                        mode = gr.Radio(editor.mode_choices(), value=editor.default_mode,
                                        label="Editing mode", elem_id="mode",
                                        info="edit: the source as Kontext reference tokens; diptych: ICEdit's "
                                             "[source | edit] canvas on a Fill model; incontext: the right panel of "
                                             "an IC-LoRA set [source | ?] made under the set caption")
                        base = gr.Dropdown(editor.base_choices(editor.default_mode),
                                           value=editor.default_base, label="Base model", elem_id="base")
                        adapter = gr.Dropdown(editor.adapter_choices(), value=BASE_OWN_ADAPTER,
                                              label="Editing adapter")
                    with gr.Accordion("LoRAs (AutoLoRA search)", open=False):
                        if editor.config.lora_index is None:
                            gr.Markdown(INDEX_HELP, elem_id="lora-help")
                        with gr.Row():
                            lora_query = gr.Textbox(label="Search LoRAs", placeholder="empty: the instruction",
                                                    elem_id="lora-query", scale=3)
                            lora_search = gr.Button("Search", elem_id="lora-search", scale=1)
                        loras = gr.Dataframe(headers=LORA_HEADERS, datatype=["bool", "number", "str", "number", "str"],
                                             column_count=(len(LORA_HEADERS), "fixed"), interactive=True,
                                             label="Tick the LoRAs to edit with, set their weights", elem_id="loras")
                        fusion = gr.Dropdown(list(FUSION_CHOICES), value=fusion_default, label="Fusion",
                                             info="gated: the learned gate; the others need no training")
                with gr.Column():
                    slider = gr.ImageSlider(label="Before / after", type="filepath", format="png", max_height=400,
                                            interactive=False, elem_id="result")
                    with gr.Row():
                        download = gr.DownloadButton("Download result", elem_id="download")
                        use = gr.Button("Use as input", elem_id="use-as-input")
                    info = gr.Markdown(elem_id="edit-info")
                    gallery = gr.Gallery(label="History (click an entry to reload it)", columns=6, height=150,
                                         allow_preview=False, fit_columns=False, object_fit="contain",
                                         elem_id="history")
                    gr.Examples(examples, inputs=[source, instruction], label="Shape World examples (click one)",
                                examples_per_page=len(examples), elem_id="examples")
        with gr.Tab("Batch"):
            gr.Markdown("One instruction over several images, with the Edit tab's task, settings and LoRAs.")
            with gr.Row(equal_height=False):
                with gr.Column():
                    batch_files = gr.File(file_count="multiple", file_types=["image"], label="Images",
                                          elem_id="batch-files")
                    batch_instruction = gr.Textbox(label="Instruction", elem_id="batch-instruction")
                    batch_run = gr.Button("Run batch", variant="primary", elem_id="batch-run")
                with gr.Column():
                    batch_gallery = gr.Gallery(label="Results", columns=4, elem_id="batch-results")
                    batch_zip = gr.DownloadButton("Download all (zip)", elem_id="batch-zip")

        settings = [task, steps, guidance, seed, random_seed, base, adapter, loras, fusion, history]
        gr.on([run.click, instruction.submit], user_errors(edit), inputs=[source, instruction, *settings, mode, caption],
              outputs=[slider, task_label, info, download, gallery, history, seed], api_name="edit",
              preprocess=False, concurrency_id=EDIT_CONCURRENCY, concurrency_limit=1)
        gr.on([batch_run.click, batch_instruction.submit], user_errors(edit_batch),
              inputs=[batch_files, batch_instruction, *settings, mode, caption],
              outputs=[batch_gallery, batch_zip, gallery, history], api_name="edit_batch", preprocess=False,
              concurrency_id=EDIT_CONCURRENCY, concurrency_limit=1)
        instruction.change(user_errors(editor.classify), instruction, task_label, api_name="classify",
                           show_progress="hidden", trigger_mode="always_last")
        gr.on([lora_search.click, lora_query.submit], user_errors(search), [lora_query, instruction], loras,
              api_name="search_loras")
        gallery.select(reload, history, [source, instruction, task, steps, guidance, seed, random_seed, base, adapter,
                                         slider, task_label, info, download, mode, caption], api_visibility="private")
        use.click(use_as_input, slider, source, api_visibility="private")
        mode.change(user_errors(mode_changed), [mode, base], [base, caption], api_visibility="private")
        gr.on([base.change, adapter.change], user_errors(model_changed), [base, adapter], steps,
              api_visibility="private", concurrency_id=EDIT_CONCURRENCY)
    return demo


def build_app(config: AppConfig) -> tuple[gr.Blocks, Editor]:
    """The page and its editor, with the model loaded (errors before the server starts; a fast first click)."""
    from gradio.utils import get_upload_folder

    output_dir = Path(config.output_dir) if config.output_dir else Path(tempfile.mkdtemp(prefix="x2edit-app-"))
    editor = Editor(config, output_dir, input_roots=[get_upload_folder()])
    editor.pipeline()
    resolution = int(math.isqrt(editor.pipeline().default_max_area))
    examples = render_examples(editor.output_dir / "examples", resolution=min(resolution, 256))
    demo = build_ui(editor, examples)
    demo.queue(max_size=config.queue_size, default_concurrency_limit=1)
    return demo, editor


def launch(config: AppConfig, block: bool = True) -> tuple[gr.Blocks, Editor]:
    """Build and serve the app; ``block=False`` returns once it serves (tests)."""
    max_bytes = parse_file_size(config.max_file_size)
    demo, editor = build_app(config)
    demo.launch(server_name=config.host, server_port=config.port, share=False, max_file_size=max_bytes,
                allowed_paths=[str(editor.output_dir)], prevent_thread_lock=not block, ssr_mode=False, quiet=not block,
                theme=gr.themes.Soft(**THEME_FONTS), css=CSS, footer_links=["api"])
    return demo, editor
