"""The interactive app: a Gradio Blocks page over a SegmentService.

Upload an image (or pick the bundled example), type expressions one per line, run; per
expression the page shows the overlay of the chosen mask, the decision in words with the scores
table, every candidate as its own tile (by DeRIS score, the chosen one framed in green), DeRIS's
own answer, and download links for the mask PNG and the JSON (COCO RLE). The gate can be switched
off and its tau moved; re-runs on the same image reuse its encoded features (the service's
cache). Mistakes show as one line in the page, cleared as soon as the image or the expressions
change. The page's CSS and script (`PAGE_CSS`, `PAGE_JS`) go to `gr.mount_gradio_app` (server.py).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import gradio as gr
import numpy as np

from ..data.refshapes.render import MAX_OBJECTS, MIN_OBJECTS
from ..data.refshapes.vocabulary import COLOURS, PLURAL, SHAPES, SIZES, STYLES
from ..errors import DerisRerankError
from ..result import Result
from ..visualize import candidate_grid, contrasting_color, decision_overlay, overlay, save_png
from .service import SegmentService

# the bundled example, present in a source checkout (not in a wheel)
EXAMPLE_IMAGE = Path(__file__).resolve().parents[2] / "demo" / "assets" / "shapes.png"
EXAMPLE_TEXT = "the biggest cross"
KEPT_RUNS = 32  # output folders of past runs kept for download links
ERROR_PREFIX = "**Error:**"  # how the status line starts when a run failed
TILE_PX = 256  # side of one candidate's tile
# galleries as tall as their pictures: Gradio's default caps them at 55% of the window and
# scrolls inside, which crops a picture taller than that
GALLERY_HEIGHT = "max-content"
CANDIDATES_TITLE = ("**Every candidate by DeRIS score**, the chosen ones framed in green, DeRIS's first choice "
                    "(Query-0) labelled \"default\"")


def _words(items: Sequence[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1]


EMBEDDED_DEFAULT_NOTE = (
    "**This server runs the small embedded default model (DeRIS-tiny).** It was trained only on synthetic "
    f"RefShapes scenes: {MIN_OBJECTS} to {MAX_OBJECTS} overlapping shapes ({_words([PLURAL[s] for s in SHAPES])}) "
    f"in {len(COLOURS)} colours ({_words(list(COLOURS))}), {len(SIZES)} sizes and {len(STYLES)} styles "
    f"({_words(list(STYLES))}) over a noisy colour gradient crossed by clutter lines, described by expressions "
    "such as \"the biggest cross\", \"the green star on the right\" or \"the square right of the outlined "
    "object\". On photographs its masks mean nothing. For real images start the app with the official weights: "
    "`deris-rerank app --deris ... --tokenizer ... --gate ...`."
)

# The scores table breaks its text between words only (Gradio's prose breaks anywhere, which split
# "rank" into "ran k" in narrow columns), and its last column ("chosen (Query-0)") not at all
PAGE_CSS = ("#decisions th, #decisions td { overflow-wrap: normal; word-break: normal; hyphens: none; }\n"
            "#decisions td:last-child { white-space: nowrap; }")
# Result images load at once, not when scrolled to (Gradio's galleries load lazily), so a
# screenshot or a print of the whole page shows them
PAGE_JS = """() => {
  const eager = () => document.querySelectorAll("#overlays img, #candidates img, #answers img")
    .forEach((img) => { if (img.loading !== "eager") img.loading = "eager"; });
  new MutationObserver(eager).observe(document.body, {childList: true, subtree: true});
}"""
# the image and the expressions changed: a shown error no longer applies (run in the browser)
CLEAR_ERROR_JS = f"(status) => (status || '').startsWith({json.dumps(ERROR_PREFIX)}) ? '' : status"

Gallery = List[Tuple[np.ndarray, Optional[str]]]  # (picture, caption)
Outputs = Tuple[str, Gallery, str, Gallery, Gallery, str, List[str]]


def describe_decision(result: Result, gate_on: bool, tau: Optional[float]) -> str:
    """The decision of `result` in one sentence (Markdown): keep or switch, or for a set answer no
    object, one or several."""
    if result.answer == "set":
        return describe_set(result)
    if result.p_fail is None:
        why = "the gate is off" if not gate_on else "this server has no re-ranker"
        return f"DeRIS's own first choice (Query-0), as {why}."
    compare = f"p_fail {result.p_fail:.3f} {'>' if tau is not None and result.p_fail > tau else '≤'} tau {tau:.2f}"
    if result.switched:
        return (f"**Switched** from Query-0 to candidate #{result.selected_rank} (DeRIS score "
                f"{result.scores[result.selected_rank]:.3f}): {compare}, so the gate judged DeRIS's first choice "
                "likely wrong and took the candidate it ranks best.")
    if tau is not None and result.p_fail > tau:
        return (f"**Kept** Query-0 (DeRIS's first choice): {compare}, but no other candidate was predicted "
                "to be better by the rule's margin.")
    return f"**Kept** Query-0 (DeRIS's first choice): {compare}, so the gate trusts DeRIS's answer."


def describe_set(result: Result) -> str:
    """A set answer in one sentence (Markdown): no object, or which candidates, and against DeRIS's own."""
    if result.object_count == 0:
        what = f"**No object matches** \"{result.text}\""
    else:
        ranks = ", ".join(f"#{rank}" for rank in result.selected_ranks)
        what = f"**{result.object_count} object{'s' if result.object_count > 1 else ''}** (candidate{'s' if result.object_count > 1 else ''} {ranks})"
    why = "" if result.p_no_target is None else f", the re-ranker's probability that nothing matches {result.p_no_target:.3f}"
    same = "another answer than" if result.switched else "the same as"
    return f"{what}: {same} DeRIS's own (its candidates above its threshold){why}."


def scores_table(result: Result) -> str:
    """The candidates by DeRIS score as a Markdown table, with the re-ranker's scores where it gives them."""
    columns = [("DeRIS score", result.scores)]
    for title, values in (("re-ranker score", result.rerank_scores), ("calibrated", result.calibrated_scores),
                          ("retrieved", result.retrieved_scores), ("member", result.member_scores)):
        if values is not None:
            columns.append((title, values))
    lines = ["| rank | slot | " + " | ".join(title for title, _ in columns) + " | |",
             "|---:|---:|" + "---:|" * len(columns) + "---|"]
    for rank, slot in enumerate(result.slots):
        mark = "chosen" if rank in result.selected_ranks else ("Query-0" if rank == 0 else "")
        if rank == 0 and rank in result.selected_ranks:
            mark = "chosen (Query-0)"
        cells = " | ".join(f"{values[rank]:.3f}" for _, values in columns)
        lines.append(f"| {rank} | {slot} | {cells} | {mark} |")
    return "\n".join(lines)


def candidate_tiles(result: Result) -> List[np.ndarray]:
    """Every candidate of `result` as its own square tile, by DeRIS score: its mask over the image,
    "#rank score", the chosen one framed in green, Query-0 labelled "default" (`candidate_grid`'s cells)."""
    column = candidate_grid(result.image, result.candidates, result.scores, result.selected_ranks, 0,
                            columns=1, tile=TILE_PX)
    return [column[rank * TILE_PX:(rank + 1) * TILE_PX] for rank in range(len(result.scores))]


def deris_answer_picture(result: Result) -> np.ndarray:
    """DeRIS's own answer (`deris_mask`) over the image, in a colour that stands out, without a legend
    (the page's heading names it; "chosen" would be wrong: the re-ranker may have chosen another)."""
    return overlay(result.image, result.deris_mask, color=contrasting_color(result.image[result.deris_mask]))


def candidates_heading(results: Sequence[Result]) -> str:
    """The heading of the candidate tiles (Markdown): which tiles belong to which expression."""
    parts, first = [], 1
    for number, result in enumerate(results, 1):
        last = first + len(result.scores) - 1
        parts.append(f"{number}. {result.text}: tiles {first}-{last}")
        first = last + 1
    return f"{CANDIDATES_TITLE}; " + "; ".join(parts) + "."


class AppCallbacks:
    """What the page's Run button calls, separate from the page so it can be tested without a browser."""

    def __init__(self, service: SegmentService, output_root: Optional[Path] = None):
        self.service = service
        self.output_root = Path(output_root) if output_root else Path(tempfile.mkdtemp(prefix="deris-rerank-app-"))
        self._runs = 0
        self._lock = threading.Lock()

    def run(self, image_path: Optional[str], expressions: str, gate_on: bool = True, tau: Optional[float] = None) -> Outputs:
        """(status, overlays, candidates heading, candidate tiles, DeRIS's answers, decisions, download files)
        for the form's values.

        image_path: the uploaded image file; expressions: one per line (blank lines ignored);
        gate_on: False answers with DeRIS's Query-0; tau: the gate's threshold (ignored without a gate).
        Mistakes come back as the status line with everything else empty.
        """
        try:
            if not image_path:
                raise DerisRerankError("no image: upload one, or pick the example below")
            texts = [line.strip() for line in (expressions or "").splitlines() if line.strip()]
            if not texts:
                raise DerisRerankError("no expression: type one per line, e.g. \"the biggest cross\"")
            try:
                data = Path(image_path).read_bytes()
            except OSError as exc:
                raise DerisRerankError(f"cannot read the uploaded image: {exc.strerror or exc}") from None
            use_tau = float(tau) if (gate_on and tau is not None and self.service.has_gate) else None
            results = self.service.segment(data, texts, name=Path(image_path).name, gate=bool(gate_on), tau=use_tau)
        except DerisRerankError as exc:
            return f"{ERROR_PREFIX} {' '.join(str(exc).split())}", [], CANDIDATES_TITLE, [], [], "", []
        shown_tau = use_tau if use_tau is not None else self.service.default_tau
        return self._outputs(results, bool(gate_on), shown_tau)

    def _outputs(self, results: Sequence[Result], gate_on: bool, tau: Optional[float]) -> Outputs:
        folder = self._run_folder()
        overlays, tiles, answers, decisions, files = [], [], [], [], []
        for number, result in enumerate(results, 1):
            caption = f"{number}. {result.text}"
            overlays.append((decision_overlay(result.image, result.mask, result.default_mask if result.switched else None), caption))
            tiles += [(tile, None) for tile in candidate_tiles(result)]
            answers.append((deris_answer_picture(result), caption))
            notes = "".join(f"\n\n_Note: {note}._" for note in result.notes if "embedded default" not in note)
            decisions.append(f"### {caption}\n\n{describe_decision(result, gate_on, tau)}{notes}\n\n{scores_table(result)}")
            mask_path = folder / f"{number:02d}_mask.png"
            save_png(mask_path, result.mask)
            json_path = folder / f"{number:02d}.json"
            json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
            files += [str(mask_path), str(json_path)]
        status = f"{len(results)} expression{'s' if len(results) != 1 else ''} answered."
        return status, overlays, candidates_heading(results), tiles, answers, "\n\n".join(decisions), files

    def _run_folder(self) -> Path:
        """A fresh folder for this run's downloads; folders of older runs beyond KEPT_RUNS are removed."""
        with self._lock:
            self._runs += 1
            number = self._runs
        folder = self.output_root / f"run-{number:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        stale = self.output_root / f"run-{number - KEPT_RUNS:06d}"
        if number > KEPT_RUNS and stale.exists():
            shutil.rmtree(stale, ignore_errors=True)
        return folder


def build_ui(service: SegmentService, callbacks: Optional[AppCallbacks] = None) -> gr.Blocks:
    """The page over `service` (mount it with gradio's `mount_gradio_app`, or `.launch()` it)."""
    callbacks = callbacks or AppCallbacks(service)
    with gr.Blocks(title="deris-rerank") as page:
        gr.Markdown("# deris-rerank\nReferring segmentation with DeRIS, re-ranked by a failure gate. "
                    "The HTTP API is at `POST /api/segment` (see docs/app.md).")
        if service.pipeline.is_embedded_default:
            gr.Markdown(EMBEDDED_DEFAULT_NOTE)
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", image_mode=None, format="png", label="image", sources=["upload", "clipboard"],
                                 elem_id="image")
                expressions = gr.Textbox(label="expressions (one per line)", lines=3, placeholder=EXAMPLE_TEXT,
                                         elem_id="expressions")
                with gr.Row():
                    gate_on = gr.Checkbox(value=service.has_gate, label="re-rank with the gate",
                                          interactive=service.has_gate)
                    tau = gr.Slider(0.0, 1.0, value=service.default_tau if service.has_gate else 0.5, step=0.01,
                                    label="tau (switch only if p_fail > tau)", interactive=service.has_gate)
                run = gr.Button("Run", variant="primary", elem_id="run")
                if EXAMPLE_IMAGE.is_file():
                    gr.Examples([[str(EXAMPLE_IMAGE), EXAMPLE_TEXT]], inputs=[image, expressions])
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                # headings above the galleries, not their labels: a label floats over the pictures' top-left corner
                gr.Markdown("**The chosen mask**, per expression", elem_id="overlays-heading")
                overlays = gr.Gallery(show_label=False, columns=2, format="png", object_fit="contain",
                                      height=GALLERY_HEIGHT, elem_id="overlays")
                decisions = gr.Markdown(elem_id="decisions")
        heading = gr.Markdown(CANDIDATES_TITLE, elem_id="candidates-heading")
        tiles = gr.Gallery(show_label=False, columns=5, format="png", object_fit="contain", height=GALLERY_HEIGHT,
                           elem_id="candidates")  # no captions either: they would cover the frame's corner
        with gr.Row():
            with gr.Column():
                gr.Markdown("**DeRIS's own answer**, per expression: its candidates above its score threshold",
                            elem_id="answers-heading")
                answers = gr.Gallery(show_label=False, columns=2, format="png", object_fit="contain",
                                     height=GALLERY_HEIGHT, elem_id="answers")
            files = gr.File(label="downloads: mask PNG and JSON (COCO RLE) per expression", file_count="multiple",
                            elem_id="downloads")
        for changed in (image.change, expressions.change):
            changed(None, inputs=[status], outputs=[status], js=CLEAR_ERROR_JS, queue=False, show_progress="hidden")
        run.click(callbacks.run, inputs=[image, expressions, gate_on, tau],
                  outputs=[status, overlays, heading, tiles, answers, decisions, files])
    return page
