"""The interactive app: a Gradio Blocks page over a SegmentService.

Upload an image (or pick the bundled example), type expressions one per line, run; per
expression the page shows the overlay of the chosen mask, the candidate grid by score, the
decision in words with the scores table, DeRIS's own answer, and download links for the mask
PNG and the JSON (COCO RLE). The gate can be switched off and its tau moved; re-runs on the same
image reuse its encoded features (the service's cache). Mistakes show as one line in the page.
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

from ..errors import DerisRerankError
from ..result import Result
from ..visualize import candidate_grid, decision_overlay, save_png
from .service import SegmentService

# the bundled example, present in a source checkout (not in a wheel)
EXAMPLE_IMAGE = Path(__file__).resolve().parents[2] / "demo" / "assets" / "shapes.png"
EXAMPLE_TEXT = "the biggest cross"
KEPT_RUNS = 32  # output folders of past runs kept for download links

EMBEDDED_DEFAULT_NOTE = (
    "**This server runs the small embedded default model (DeRIS-tiny).** It was trained only on synthetic "
    "RefShapes scenes: coloured circles, squares, triangles and crosses on a plain background, described by "
    "expressions such as \"the biggest cross\" or \"the red circle on the left\". On photographs its masks "
    "mean nothing. For real images start the app with the official weights: "
    "`deris-rerank app --deris ... --tokenizer ... --gate ...`."
)

Gallery = List[Tuple[np.ndarray, str]]
Outputs = Tuple[str, Gallery, Gallery, Gallery, str, List[str]]


def describe_decision(result: Result, gate_on: bool, tau: Optional[float]) -> str:
    """The keep-or-switch decision of `result` in one sentence (Markdown)."""
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


def scores_table(result: Result) -> str:
    """The candidates by DeRIS score as a Markdown table, with the re-ranker's scores where it gives them."""
    columns = [("DeRIS score", result.scores)]
    for title, values in (("re-ranker score", result.rerank_scores), ("calibrated", result.calibrated_scores),
                          ("retrieved", result.retrieved_scores)):
        if values is not None:
            columns.append((title, values))
    lines = ["| rank | slot | " + " | ".join(title for title, _ in columns) + " | |",
             "|---:|---:|" + "---:|" * len(columns) + "---|"]
    for rank, slot in enumerate(result.slots):
        mark = "chosen" if rank == result.selected_rank else ("Query-0" if rank == 0 else "")
        if rank == 0 and rank == result.selected_rank:
            mark = "chosen (Query-0)"
        cells = " | ".join(f"{values[rank]:.3f}" for _, values in columns)
        lines.append(f"| {rank} | {slot} | {cells} | {mark} |")
    return "\n".join(lines)


class AppCallbacks:
    """What the page's Run button calls, separate from the page so it can be tested without a browser."""

    def __init__(self, service: SegmentService, output_root: Optional[Path] = None):
        self.service = service
        self.output_root = Path(output_root) if output_root else Path(tempfile.mkdtemp(prefix="deris-rerank-app-"))
        self._runs = 0
        self._lock = threading.Lock()

    def run(self, image_path: Optional[str], expressions: str, gate_on: bool = True, tau: Optional[float] = None) -> Outputs:
        """(status, overlays, candidate grids, DeRIS's answers, decisions, download files) for the form's values.

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
            return f"**Error:** {' '.join(str(exc).split())}", [], [], [], "", []
        shown_tau = use_tau if use_tau is not None else self.service.default_tau
        return self._outputs(results, bool(gate_on), shown_tau)

    def _outputs(self, results: Sequence[Result], gate_on: bool, tau: Optional[float]) -> Outputs:
        folder = self._run_folder()
        overlays, grids, answers, decisions, files = [], [], [], [], []
        for number, result in enumerate(results, 1):
            caption = f"{number}. {result.text}"
            overlays.append((decision_overlay(result.image, result.mask, result.default_mask if result.switched else None), caption))
            grids.append((candidate_grid(result.image, result.candidates, result.scores, result.selected_rank, 0), caption))
            answers.append((decision_overlay(result.image, result.deris_mask), f"{caption} (DeRIS's own answer)"))
            notes = "".join(f"\n\n_Note: {note}._" for note in result.notes if "embedded default" not in note)
            decisions.append(f"### {caption}\n\n{describe_decision(result, gate_on, tau)}{notes}\n\n{scores_table(result)}")
            mask_path = folder / f"{number:02d}_mask.png"
            save_png(mask_path, result.mask)
            json_path = folder / f"{number:02d}.json"
            json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
            files += [str(mask_path), str(json_path)]
        status = f"{len(results)} expression{'s' if len(results) != 1 else ''} answered."
        return status, overlays, grids, answers, "\n\n".join(decisions), files

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
                overlays = gr.Gallery(label="chosen mask per expression", columns=2, format="png", elem_id="overlays")
                decisions = gr.Markdown(elem_id="decisions")
        with gr.Row():
            grids = gr.Gallery(label="candidates by DeRIS score (chosen framed in green)", columns=1, format="png")
            answers = gr.Gallery(label="DeRIS's own answer", columns=2, format="png")
        files = gr.File(label="downloads: mask PNG and JSON (COCO RLE) per expression", file_count="multiple",
                        elem_id="downloads")
        run.click(callbacks.run, inputs=[image, expressions, gate_on, tau],
                  outputs=[status, overlays, grids, answers, decisions, files])
    return page
