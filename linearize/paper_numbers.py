"""The paper's published numbers (Benfeghoul et al. 2025, arXiv 2510.05901 v2), as reference data for the rendered
tables. Transcribed from ``shared/PAPER.md``; nothing here is computed by this project.

Scores are lm-eval accuracies in % (PIQA acc, ARC-E acc, ARC-C acc_norm, HellaSwag acc_norm, WinoGrande acc,
0-shot; MMLU 5-shot), ``avg`` the mean of the six, ``rec`` = avg / base avg x 100. A key that the paper does not
give is absent (rendered as "-").

``PAPER[model][table][key]``: ``model`` is a ``conf/model`` option, ``table`` a ``conf/experiment`` folder and
``key`` the ``paper`` key of a row in ``linearize.tables.LAYOUTS``.
"""

from __future__ import annotations

TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "mmlu")

SOURCE = "Benfeghoul et al. 2025 (arXiv 2510.05901 v2), published numbers"

MODEL_NAMES = {
    "mistral7b": "Mistral-7B",
    "llama3_8b": "Llama3-8B",
    "llama31_8b": "Llama3.1-8B (public LoLCATs checkpoint)",
}


def _row(*scores: float, avg: float | None = None, rec: float | None = None) -> dict[str, float]:
    """Six task scores in TASKS order (or none), then AVG and Rec."""
    out = dict(zip(TASKS, scores, strict=True)) if scores else {}
    if avg is not None:
        out["avg"] = avg
    if rec is not None:
        out["rec"] = rec
    return out


PAPER: dict[str, dict[str, dict[str, dict[str, float]]]] = {
    "mistral7b": {
        # Table 1, component ablations of the LoLCATs conversion
        "table1": {
            "base": _row(79.27, 80.01, 52.22, 74.60, 69.93, 53.51, avg=68.26, rec=100),
            "hybrid": _row(78.40, 79.50, 49.91, 71.28, 68.35, 45.44, avg=65.48, rec=95.93),
            "swa_only": _row(78.56, 79.46, 49.83, 70.57, 68.35, 46.56, avg=65.56, rec=96.04),
            "la_only": _row(53.65, 29.71, 24.57, 27.01, 50.43, 23.28, avg=34.78, rec=50.95),
            "sinks_only": _row(54.41, 30.05, 24.66, 28.80, 49.64, 23.67, avg=35.21, rec=51.58),
            "no_attention": _row(53.92, 25.63, 24.66, 25.99, 50.67, 25.51, avg=34.40, rec=50.39),
        },
        # Tables 2-3, linear-only models after one epoch of transfer, no LoRA; per-task scores are published for the
        # square projection only, the halved projection and the floor have AVG only
        "table2_3": {
            "weights_square": _row(67.90, 61.74, 29.69, 45.82, 52.64, 23.82, avg=46.94, rec=68.76),
            "outputs_square": _row(69.64, 62.46, 31.40, 46.61, 50.28, 23.00, avg=47.23, rec=69.20),
            "hybrid_outputs_square": _row(55.44, 32.83, 24.06, 27.36, 49.80, 22.98, avg=35.41, rec=51.88),
            "weights_halved": _row(avg=43.25),
            "outputs_halved": _row(avg=42.60),
            "hybrid_outputs_halved": _row(avg=34.59),
            "no_attention": _row(avg=34.40),
        },
        # Table 4 (AVG / Rec). The model is not named in the transcription; its softmax row equals Table 2's
        # Mistral-7B attention-weights row (46.94 / 68.76)
        "table4": {
            "softmax": _row(avg=46.94, rec=68.76),
            "exp": _row(avg=46.11, rec=67.55),
            "relu": _row(avg=36.07, rec=52.85),
            "elu": _row(avg=35.12, rec=51.45),
            "identity": _row(avg=34.81, rec=51.00),
        },
        # Remedies: only the headline figure "SSD on Mistral-7B: 95.2% of base" was recoverable
        "remedies": {
            "ssd/hybrid": _row(rec=95.2),
        },
    },
    "llama3_8b": {
        "table1": {
            "base": _row(78.13, 81.69, 56.66, 75.94, 71.67, 63.85, avg=71.32, rec=100),
            "hybrid": _row(78.35, 80.47, 54.35, 71.62, 71.67, 48.84, avg=67.55, rec=94.71),
            # as published; 66.08 / 71.32 x 100 = 92.65 (the only Rec of Table 1 that does not follow from its AVG)
            "swa_only": _row(78.02, 80.01, 54.10, 65.08, 71.98, 47.30, avg=66.08, rec=92.26),
            "la_only": _row(52.07, 25.97, 25.77, 26.31, 48.22, 22.95, avg=33.55, rec=47.04),
            "sinks_only": _row(56.31, 29.00, 22.61, 28.83, 49.41, 22.95, avg=34.85, rec=48.86),
            "no_attention": _row(55.17, 26.73, 22.87, 26.13, 51.14, 22.95, avg=34.17, rec=47.91),
        },
    },
    "llama31_8b": {
        # the paper evaluated the public LoLCATs Llama-3.1-8B checkpoint; it gives no sinks-only row
        "table1": {
            "base": _row(80.14, 81.82, 55.20, 79.14, 73.72, 68.05, avg=73.01, rec=100),
            "hybrid": _row(81.18, 82.37, 54.78, 79.16, 70.09, 58.89, avg=71.08, rec=97),
            "swa_only": _row(81.56, 82.37, 55.29, 79.76, 74.11, 55.63, avg=71.45, rec=98),
            "la_only": _row(51.52, 25.00, 25.51, 26.37, 52.25, 23.09, avg=33.96, rec=47),
            "no_attention": _row(54.62, 26.68, 24.40, 25.88, 48.86, 23.12, avg=33.93, rec=46),
        },
    },
}


def reference(model: str, table: str, key: str | None) -> dict[str, float] | None:
    """The published scores of one row, or None when the paper has none for this model / table / row."""
    if key is None:
        return None
    return PAPER.get(model, {}).get(table, {}).get(key)
