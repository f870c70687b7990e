"""The comparison's report: the markdown page (one function per section), its verdict lines and its two plots."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.demo.compare.cells import COLUMN_NAMES, DEFAULT_TOKEN_MODE, HELDOUT, VAL, setting_label


def plots(summary: dict, abl: dict | None, lengths, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = list(summary["methods"])
    fig, axes = plt.subplots(1, len(HELDOUT), figsize=(4.5 * len(HELDOUT), 3.6))
    for ax, t in zip(axes, HELDOUT):
        ms = [summary["methods"][m]["scores"][t] for m in names]
        ax.bar(names, [x["mean"] for x in ms], yerr=[x["std"] for x in ms], capsize=3, color="#4c72b0")
        ax.axhline(summary["majority"][t], color="#c44e52", ls="--", label="majority answer")
        ax.axhline(summary["base"][t], color="#55a868", ls=":", label="un-tuned base")
        ax.set_title(f"{COLUMN_NAMES[t]} (held out)")
        ax.set_ylabel("accuracy (%)")
        ax.tick_params(axis="x", rotation=30)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    files = [folder / "methods.png"]
    fig.savefig(files[0], dpi=110)
    plt.close(fig)
    if abl:
        grid = [[abl["heldout_mean"][f"pv{pv}-pt{pt}"] for pt in lengths] for pv in lengths]
        fig, ax = plt.subplots(figsize=(4.6, 3.8))
        im = ax.imshow(grid, cmap="viridis", origin="lower")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_yticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_xlabel("textual prompt length pt")
        ax.set_ylabel("visual prompt length pv")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax, label="mean held-out accuracy (%)")
        fig.tight_layout()
        files.append(folder / "ablation.png")
        fig.savefig(files[1], dpi=110)
        plt.close(fig)
    return [str(f) for f in files]


def verdict(summary: dict) -> list[str]:
    """What the table supports, computed: a difference counts when it is more than two standard errors, the error
    holding both the spread over seeds and the sampling of the questions (`_difference`)."""
    n, ms = summary["seeds"], summary["methods"]
    if n < 2:  # why: with one seed the spread over seeds is unknown, and a claim would rest on the question draw alone
        return ["- One seed: no spread over seeds, so no claim of a difference beyond 2 SE is made (run --seeds 2 or "
                "more for one)."]

    def beyond(x: dict) -> bool:
        return abs(x["diff"]) > 2 * x["se"]

    def diff(x: dict) -> str:
        return f"{x['diff']:+.1f} ± {x['se']:.1f}" + (" (beyond 2 SE)" if beyond(x) else "")

    lines = []
    for t in HELDOUT:
        above = [f"{m} ({r['vs_majority'][t]['diff']:+.1f} ± {r['vs_majority'][t]['se']:.1f})" for m, r in ms.items()
                 if r["vs_majority"][t]["diff"] > 0 and beyond(r["vs_majority"][t])]
        lines.append(f"- {t}: " + (f"above the majority answer by more than 2 SE: {', '.join(above)}." if above else
                                   "no method is above the majority answer by more than 2 SE."))
    for m, r in ms.items():
        lines.append(f"- {m} − un-tuned base on held-out tasks: "
                     + "; ".join(f"{t} {diff(r['vs_base'][t])}" for t in HELDOUT) + ".")
    for other in [m for m in ("visual", "text", "lora") if m in ms.get("m2pt", {}).get("vs_method", {})]:
        vs = ms["m2pt"]["vs_method"][other]
        lines.append(f"- m2pt − {other} on held-out tasks: " + "; ".join(f"{t} {diff(vs[t])}" for t in HELDOUT) + ".")
    return lines


def base_description() -> str:
    """Which base every cell started from, with the record that produced it."""
    from pipeline.demo.tiny import tiny_record

    rec = tiny_record()
    sc, cfg = rec.get("scores", {}), rec.get("config", {})
    untrained = sc.get("image_qa_untrained")
    lr = cfg.get("lr")
    joint_lr = cfg.get("joint_lr") or lr
    stages = [f"{n:,} steps of {what}" for n, what in (
        (cfg.get("language_steps", 0), f"text QA for the language model alone (peak lr {lr:g})"),
        (cfg.get("align_steps", 0), f"captioning for the vision tower and projector, the language model frozen "
                                    f"(peak lr {lr:g})"),
        (cfg.get("steps", 0), f"captioning and text QA with every weight (peak lr {joint_lr:g})")) if n]
    return (f"Base: the embedded pretrained tiny model (`pipeline/demo/assets/{rec['file']}`, sha256 "
            f"`{rec['sha256'][:16]}…`, "
            f"made by `{rec['command']}`; on fresh samples: caption exact match {sc.get('caption_exact_match')} %, "
            f"text-only QA {sc.get('text_qa')} %"
            + (f"; the same questions asked about the image, never trained: {untrained} %" if untrained is not None
               else "")
            + "). Every method starts from it; all but `full` keep it frozen. Its pretraining: "
            + "; then ".join(stages)
            + ". The text QA covered every question form, the held-out ones included, but it never saw a question "
            "about an image.")


def answers_table(summary: dict) -> list[str]:
    """The report's section on what the held-out answers are (`answer_sources`)."""
    rows = [("un-tuned base", summary["base_answers"])] + [(m, r["answers"]) for m, r in summary["methods"].items()]

    def cell(a: dict) -> str:
        return f"{a['off_task']:.1f} (\"{a['top_wrong']}\" {a['top_wrong_share']:.1f})"

    return ["## What the held-out answers are", "",
            "Share of the answers (%, pooled over seeds) that are no answer of the task at all (not one of its "
            "targets: a word where a digit is asked); in brackets the most frequent wrong answer and how many of all "
            "answers (%) are it, wrong. A score below the un-tuned base with a high share here comes from answering "
            "another question; with a low share, from answering the question asked, wrongly.", "",
            "| method | " + " | ".join(COLUMN_NAMES[t] for t in HELDOUT) + " |", "|---" * (len(HELDOUT) + 1) + "|",
            *[f"| {name} | " + " | ".join(cell(a[t]) for t in HELDOUT) + " |" for name, a in rows], ""]


def _seed_words(summary: dict) -> str:
    n, first = summary["seeds"], summary.get("first_seed", 0)
    return f"{n} seed(s)" + (f" ({first}-{first + n - 1})" if first else "")


def _intro(summary: dict, command: str, chosen: bool) -> list[str]:
    runs = "; ".join(f"{i['cells_run']} cell(s) " + (f"ran {i['jobs']} at a time in {i['wall_seconds']:,} s wall"
                                                     if i["wall_seconds"] is not None else
                                                     "from runs that were not logged")
                     for i in summary["invocations"])
    lines = ["# Method comparison on the embedded sample set", "",
             f"Produced by `{command}`: {_seed_words(summary)}, {summary['max_steps']} steps per run "
             f"({summary['cell_seconds']:,} s of runs in the method grid, summed over cells; " + runs + "); "
             + ("the learning rate of each method was chosen on the validation records of the training task types"
                if chosen else "each method ran at the one setting given (--lrs, --visual_token_modes): nothing was "
                               "chosen") + ". Scores are accuracy (%), mean ± std over seeds.", ""]
    if chosen and any(r.get("visual_token_mode") for r in summary["methods"].values()):
        lines += ["The methods with visual prompts also chose, on the same validation records, what the language "
                  "model is handed: *official* (the reference code and the trainer's default: N + pv visual tokens, "
                  "the feature layer's prompt slots and CLS beside the N patches) or *clean* (the N patch tokens, as "
                  "in standard LLaVA). The lr column names the choice.", ""]
    return lines


def _results_table(summary: dict, cols: tuple) -> list[str]:
    names = {t: COLUMN_NAMES[t] + (" (held out)" if t in HELDOUT else "") for t in cols}
    lines = ["| method | lr | trainable | " + " | ".join(names[c] for c in cols) + " | wall s (all seeds) |",
             "|---" * (len(cols) + 4) + "|",
             "| majority answer | – | – | " + " | ".join(f"{summary['majority'][c]:.1f}" for c in cols) + " | – |",
             "| un-tuned base | – | 0 | " + " | ".join(f"{summary['base'][c]:.1f}" for c in cols) + " | – |"]
    for m, r in summary["methods"].items():
        tr = r["trainable"] or {"parameters": 0, "share": 0}
        cells = " | ".join(f"{r['scores'][c]['mean']:.1f} ± {r['scores'][c]['std']:.1f}" for c in cols)
        lines.append(f"| {m} | {setting_label(r.get('visual_token_mode'), r['lr'])} | {tr['parameters']:,} "
                     f"({100 * tr['share']:.2f} %) | {cells} | {r['seconds']:.0f} |")
    return lines


def _validation_lines(summary: dict, chosen: bool) -> list[str]:
    lines = ["", "Validation accuracy (training task types) of each setting, mean over seeds"
             + ("; the best was chosen:" if chosen else ":"), ""]
    for m, r in summary["methods"].items():
        grid = sorted(r["val_by_setting"], key=lambda x: (x["visual_token_mode"] or "", x["lr"]))
        lrs = {x["lr"] for x in grid}
        edge = " (the top of the grid)" if r["lr"] == max(lrs) and len(lrs) > 1 else ""
        lines.append(f"- {m}: " + ", ".join(f"{setting_label(x['visual_token_mode'], x['lr'])}: {x['val']:.1f}"
                                            for x in grid) + edge)
    return lines


def _ablation_section(summary: dict, abl: dict, image: str, report: Path) -> list[str]:
    lengths = sorted({int(k.split("-")[0][2:]) for k in abl["heldout_mean"]})
    reused = (" Cells that are a run of the method grid are that run, not trained twice: "
              + ", ".join(f"{k} = {t}" for k, t in abl["reused"].items()) + "." if abl["reused"] else "")
    lines = ["## Prompt-length ablation", "",
             f"M²PT at its chosen lr {abl['lr']:g} ({abl.get('visual_token_mode', DEFAULT_TOKEN_MODE)} visual "
             f"tokens where pv > 0), seed {summary.get('first_seed', 0)}, {summary['max_steps']} steps; "
             "pv = pt = 0 is the projector alone. Each cell: mean accuracy over the four held-out tasks / "
             "training-task validation accuracy." + reused, "",
             f"![ablation]({os.path.relpath(image, report.parent)})", "",
             "| pv \\ pt | " + " | ".join(str(pt) for pt in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for pv in lengths:
        lines.append(f"| {pv} | " + " | ".join(f"{abl['heldout_mean'][f'pv{pv}-pt{pt}']:.1f} / "
                                               f"{abl['val'][f'pv{pv}-pt{pt}']:.1f}" for pt in lengths) + " |")
    return lines + [""]


def markdown(summary: dict, abl: dict | None, images: list[str], report: Path, command: str) -> str:
    cols = (*HELDOUT, VAL)
    chosen = any(len(r["val_by_setting"]) > 1 for r in summary["methods"].values())
    lines = [*_intro(summary, command, chosen), base_description(), "", *_results_table(summary, cols),
             *_validation_lines(summary, chosen),
             "", *verdict(summary), "", f"![methods]({os.path.relpath(images[0], report.parent)})", "",
             *answers_table(summary)]
    if abl:
        lines += _ablation_section(summary, abl, images[1], report)
    return "\n".join(lines) + "\n"
