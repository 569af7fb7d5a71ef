"""The model card: one page per registered version, in the two forms MLflow's own artifact viewer renders.

MLflow 3's viewer renders Markdown with tables and working links but shows no pictures (its renderer drops
image syntax), and HTML with pictures but in a sandboxed frame whose links do not open. So the card is
written once and rendered twice, both logged to the run under `model_card/`:

- `model_card.md`: tables and links that click in MLflow (the run, the version page, each picture opened in
  MLflow's image viewer, the HTML card); it is also the card in `graft bundle`;
- `model_card.html`: the same card with its pictures inside the page (data URIs), readable in MLflow's viewer,
  in any browser and offline.

The card is written once the version is registered, so it names the version; the version's description links to it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from components.backbones.spec import BackboneSpec
from components.backbones.zoo import get_spec
from components.core.config import changed_settings
from components.data.versions import dvc_file_for
from components.deploy.facts import DeployFacts
from components.evaluate.gate import signed_points
from components.registry import ui_links
from components.runtime.bundle import MODEL_CARD, MODEL_CARD_DIR, MODEL_CARD_HTML
from components.runtime.cpu import INT8_FOR_EVERY_CPU

CARD_ARTIFACT_DIR = MODEL_CARD_DIR
"""Where the run keeps its cards (`model_card/`)."""


CARD_NAME = MODEL_CARD


CARD_HTML_NAME = MODEL_CARD_HTML


REPORT_ARTIFACT_DIR = "evaluate"


# MLflow stores a version's description in a 5000-character column.
MAX_DESCRIPTION = 4000


@dataclass(frozen=True)
class ModelCard:
    """The card on disk (Markdown and HTML) and where the run keeps it."""

    path: Path
    html_path: Path
    uri: str
    """`runs:/<run>/model_card/model_card.md`."""


@dataclass(frozen=True, kw_only=True)
class CardFacts(DeployFacts):
    """Everything a card says: the deploy stage's facts, and where the model went in MLflow."""

    run_id: str
    version: str | None = None
    """The registered version the card describes (None: not registered)."""
    experiment_id: str | None = None
    """For links into MLflow's UI (None: the card links nothing in MLflow)."""
    model_id: str | None = None
    """The version's MLflow LoggedModel."""

    @classmethod
    def of(cls, facts: DeployFacts, run_id: str, version: str | None = None, experiment_id: str | None = None,
           model_id: str | None = None) -> CardFacts:
        return cls(**{f.name: getattr(facts, f.name) for f in fields(DeployFacts)}, run_id=run_id, version=version,
                   experiment_id=experiment_id, model_id=model_id)

    @property
    def spec(self) -> BackboneSpec:
        return get_spec(self.trained.backbone)


def _table(header: tuple[str, ...], rows: list[tuple[object, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _data_section(facts: CardFacts) -> list[str]:
    split = facts.split
    counts = split.counts()
    test_note = (
        "There is no separate test split (`data.test_fraction: 0`): **the test metrics below are validation metrics**, "
        "and the validation images chose the epoch."
        if split.test_is_val else
        "The test images were not looked at until the model was trained: the gate and the metrics below come from them."
    )
    lines = [
        "## Data",
        "",
        f"- **Version (DVC md5):** `{facts.data_md5}`",
        f"- **Folder:** `{split.root}`; split by {split.describe()}",
        f"- **Classes ({len(split.classes)}):** {', '.join(f'`{c}`' for c in split.classes)}",
        "",
        "Three splits, each with one job: **train** fits the weights; **validation** chooses the epoch (early stopping)"
        " and fits the softmax temperature, so its figures are optimistic; **test** judges the model. An image's split"
        " follows from its content hash and the split settings, so adding, removing or renaming other images never"
        f" moves it. {test_note} The version carries the content hashes of each split (`split_manifest.json`), and the"
        " gate compares it with the champion only on test images neither of them trained or early-stopped on.",
        "",
    ]
    lines += _table(("class", "train images", "val images", "test images"),
                    [(c, counts["train"][c], counts["val"][c], counts["test"][c]) for c in split.classes])
    return [*lines, ""]


def _size_and_start(spec: BackboneSpec) -> str:
    """"4.7M parameters, ImageNet pre-trained": a user backbone (`choose.custom`) has no catalogue size, and its
    weights are its own."""
    size = f"{spec.params_m:.1f}M parameters, " if spec.params_m is not None else ""
    if not spec.pretrained:
        return f"{size}randomly initialised"
    return f"{size}{'pre-trained, its own weights' if spec.family.startswith('custom:') else 'ImageNet pre-trained'}"


def _model_section(facts: CardFacts) -> list[str]:
    spec, trained = facts.spec, facts.trained
    temperature = facts.evaluation.temperature
    calibrated = (
        f"{temperature:.3f}, fitted on the validation split (evaluate.temperature_scaling)"
        if facts.params.evaluate.temperature_scaling else "1 (no temperature scaling)"
    )
    return [
        "## Model",
        "",
        f"- **Backbone:** `{spec.name}` ({spec.family}, {_size_and_start(spec)})",
        f"- **Weights source:** {spec.weights_source}",
        *_weights_lines(spec),
        f"- **Licence:** {spec.licence}",
        f"- **Strategy:** `{trained.strategy}`; {trained.epochs_run} epochs run, best epoch {trained.best_epoch} "
        f"(validation loss {trained.best_val_loss:.4f})",
        f"- **Input:** uint8 RGB, N x {trained.image_size} x {trained.image_size} x 3; scaling and normalisation "
        f"(mean {[round(m, 4) for m in spec.mean]}, std {[round(s, 4) for s in spec.std]}) are inside the graph",
        f"- **Output:** probabilities over the {len(trained.classes)} classes, softmax temperature {calibrated}",
        "",
        "Hyper-parameters (`train`, as this run used them):",
        "",
        *_table(("parameter", "value"), [(f"`{k}`", v) for k, v in facts.params.train.model_dump(mode="json").items()]),
        "",
        *([f"**Not as in the project's params.yaml** (set on the command line or in another params file): "
           f"{changed_in_words(changed)}", ""] if (changed := changed_settings(facts.params)) else []),
    ]


def changed_in_words(changed: dict[str, tuple[object, object]], limit: int = 60) -> str:
    """`evaluate.gate_test` none (params.yaml: mcnemar); ...: the settings a run did not take from the project's
    params.yaml (`components.core.config.changed_settings`), so a relaxed gate is seen where the verdict is read."""
    def short(value: object) -> str:
        text = str(value)
        return text if len(text) <= limit else text[: limit - 3] + "..."

    return "; ".join(f"`{key}` {short(mine)} (params.yaml: {short(theirs)})" for key, (mine, theirs) in changed.items())


def _weights_lines(spec: BackboneSpec) -> list[str]:
    """The weights file used: its revision, sha256 and where it is published (`BackboneSpec.provenance`)."""
    facts = spec.provenance()
    labels = (("weights.revision", "Weights revision"), ("weights.sha256", "Weights sha256"), ("weights.url", "Weights URL"))
    lines = [f"- **{label}:** `{facts[key]}`" for key, label in labels if key in facts]
    if spec.interpolation != "bilinear":
        lines.append(f"- **Published resize:** {spec.interpolation} (Graft resizes bilinearly, in training and in serving alike)")
    return lines


def _metrics_section(facts: CardFacts) -> list[str]:
    evaluation = facts.evaluation
    lines = ["## Metrics", "", f"Validation ({len(facts.split.val)} images, chose the epoch) and {evaluation.test_label} "
             f"({len(facts.split.evaluation)} images):", ""]
    lines += _table(("metric", "validation", evaluation.test_label),
                    [(name, f"{value:.4f}", f"{evaluation.test.get(name, float('nan')):.4f}") for name, value in evaluation.val.items()])
    lines += ["", f"Per class ({evaluation.test_label}):", ""]
    lines += _table(
        ("class", "precision", "recall", "F1", "support"),
        [(c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", m["support"]) for c, m in evaluation.per_class.items()],
    )
    lines.append("")
    for picture in evaluation.pictures:
        lines += [f"![{picture.stem.replace('_', ' ')}]({PICTURE_PREFIX}{picture.name})", ""]
    if facts.params.evaluate.temperature_scaling:
        lines += ["", "The temperature was fitted on the validation images, so their calibration numbers are optimistic; "
                  "the test figures are not."]
    return [*lines, ""]


def _gate_section(facts: CardFacts) -> list[str]:
    verdict = facts.verdict
    lines = [
        "## Gate verdict",
        "",
        f"**{'Promoted to champion' if verdict.promote else 'Not promoted: the champion stays'}** "
        f"(metric `{verdict.metric}`, test `{verdict.test}`).",
        "",
    ]
    lines += [f"- {'passed' if check.passed else 'FAILED'}: {check.reason}" for check in verdict.checks]
    return [*lines, ""]


def _variants_section(facts: CardFacts) -> list[str]:
    variants = facts.variants
    if variants is None or not variants.variants:
        return []
    lines = ["## Variants", "",
             f"Each variant beside the fp32 `model.onnx` was scored on the {len(facts.split.evaluation)} test images against fp32 "
             f"(accuracy {variants.fp32_accuracy:.4f}); one losing more than deploy.max_variant_drop="
             f"{facts.params.deploy.max_variant_drop:g} is not published. Load one with `OnnxClassifier.load(..., variant=NAME)`.", ""]
    lines += _table(
        ("variant", "file", "published", "accuracy", "change vs fp32", "top-1 agreement", "speed-up vs fp32 (batch 1, 32)", "size"),
        [(v.name, f"`{v.path.name}`", "yes" if v.published else "no", f"{v.accuracy:.4f}", f"{signed_points(v.accuracy_change)} pts",
          f"{v.top1_agreement:.1%}", f"{v.speed.speedup_batch1:.2f}x, {v.speed.speedup_batch:.2f}x" if v.speed else "not timed",
          f"{v.size_bytes / 1e6:.1f} MB") for v in variants.variants],
    )
    rejected = [f"- {v.name}: {v.reason}" for v in variants.variants if not v.published]
    portable = [f"- {v.name} keeps this accuracy on {v.keeps_accuracy_on}; on other CPUs `variant=\"auto\"` loads the next variant "
                f"instead ({INT8_FOR_EVERY_CPU})"
                for v in variants.variants if v.published and v.keeps_accuracy_on]
    notes = [*rejected, *portable]
    return [*lines, "", *notes, *([""] if notes else [])]


def _export_section(facts: CardFacts) -> list[str]:
    exported, cfg = facts.exported, facts.params.deploy
    return [
        "## ONNX export and parity",
        "",
        f"- **File sha256:** `{exported.sha256}` (opset {exported.opset})",
        f"- **Graph:** {exported.how_made}",
        f"- **Parity with PyTorch** on {exported.parity_images} validation images: max |diff| "
        f"{exported.max_abs_diff:.2e} (limit {cfg.parity_atol:g}), top-1 agreement {exported.top1_agreement:.0%}",
        "",
    ]


def _reproduce_section(facts: CardFacts) -> list[str]:
    commit = facts.commit.removesuffix("-dirty")
    dirty = facts.commit.endswith("-dirty")
    dvc_file = dvc_file_for(facts.split.root)
    data_step = (
        f"dvc pull {dvc_file.name}                 # data md5 {facts.data_md5}"
        if dvc_file.is_file()
        else f"# put the same images in {facts.split.root}; `dvc add` on it must give md5 {facts.data_md5}"
    )
    params_yaml = yaml.safe_dump(facts.params.model_dump(mode="json"), sort_keys=False).rstrip()
    lines = [
        "## Reproduce",
        "",
        "```bash",
        f"git checkout {commit}",
        "make setup",
        data_step,
        "# save the parameters below as run_params.yaml",
        ".venv/bin/graft run --params run_params.yaml --summary outputs/summary.json",
        f".venv/bin/graft predict --model models:/{facts.params.deploy.model_name}/{facts.version or 'VERSION'} IMAGE...",
        "```",
        "",
    ]
    if dirty:
        lines += [f"The run was made with uncommitted changes on top of `{commit}`; they are not in that commit.", ""]
    lines += ["Parameters of this run:", "", "```yaml", params_yaml, "```", ""]
    return lines


PICTURE_PREFIX = "picture:"
"""Placeholder before a picture's file name in the card's source; each rendering replaces it (see `render_card`)."""


def _links_section(facts: CardFacts, linked: bool = True) -> list[str]:
    """Where to go next in MLflow's UI (fragment links: they work on any MLflow server). Without `linked` (the HTML
    card, which MLflow shows in a sandboxed frame and bundles open from disk, where no MLflow link can open) the
    places are named instead."""
    if facts.experiment_id is None:
        return []
    name = facts.params.deploy.model_name
    if not linked:
        places = [f"{name} v{facts.version} (Models)" if facts.version else None, f"the run `{facts.run_id}`",
                  f"the logged model `{facts.model_id}` (its artifacts hold `registration.json`)" if facts.model_id else None]
        return ["In MLflow: " + " · ".join(p for p in places if p) + ".", ""]
    links = [f"[the run]({ui_links.run_page(facts.experiment_id, facts.run_id)})"]
    if facts.version:
        links.insert(0, f"[{name} v{facts.version}]({ui_links.version_page(name, facts.version)})")
    if facts.model_id:
        links.append(f"[its logged model and `registration.json`]({ui_links.logged_model_page(facts.experiment_id, facts.model_id, 'artifacts')})")
    links.append(f"[this card with its pictures]({ui_links.run_artifact(facts.experiment_id, facts.run_id, f'{CARD_ARTIFACT_DIR}/{CARD_HTML_NAME}')})")
    return ["In MLflow: " + " · ".join(links) + ".", ""]


def card_source(facts: CardFacts, linked: bool = True) -> str:
    """The card's Markdown, pictures written as `![alt](picture:<file>)` for `render_card` to resolve; `linked`: links
    into MLflow's UI (not in the HTML card: see `_links_section`)."""
    name = facts.params.deploy.model_name
    title = f"{name} v{facts.version}" if facts.version else name
    head = [
        f"# Model card: {title}",
        "",
        summarise(facts),
        "",
        f"MLflow run `{facts.run_id}`, git commit `{facts.commit}`"
        + (f", logged model `{facts.model_id}`." if facts.model_id else "."),
        "",
        *_links_section(facts, linked),
    ]
    limits = [
        "## Intended use and limits",
        "",
        f"Classifies images into the {len(facts.trained.classes)} classes above and nothing else: an image of any "
        "other kind still gets one of these labels. The test figures come from "
        f"{len(facts.split.evaluation)} test images of this data version only"
        + (" (validation images: there is no test split), which also chose the epoch, so they are optimistic."
           if facts.split.test_is_val else "; images unlike them may score lower."),
        "",
    ]
    sections = (_data_section, _model_section, _metrics_section, _variants_section, _gate_section, _export_section, _reproduce_section)
    body = [line for section in sections for line in section(facts)]
    return "\n".join([*head, *body, *limits])


def render_card(facts: CardFacts) -> str:
    """The card as Markdown for MLflow's viewer and bundles: each picture a link (MLflow's Markdown shows no images),
    opening it in MLflow's image viewer when the run is known, else the file beside the run's `evaluate/` folder."""
    def picture_link(name: str) -> str:
        if facts.experiment_id is not None:
            return ui_links.run_artifact(facts.experiment_id, facts.run_id, f"{REPORT_ARTIFACT_DIR}/{name}")
        return f"../{REPORT_ARTIFACT_DIR}/{name}"

    lines = []
    for line in card_source(facts).split("\n"):
        if line.startswith("![") and f"]({PICTURE_PREFIX}" in line:
            alt, _, rest = line[2:].partition("](")
            file = rest.removeprefix(PICTURE_PREFIX).rstrip(")")
            line = f"Picture: [{alt}]({picture_link(file)}) (`{REPORT_ARTIFACT_DIR}/{file}`)"
        lines.append(line)
    return "\n".join(lines)


def render_card_html(facts: CardFacts) -> str:
    """The card as one self-contained HTML page: the same text, each picture inside the page as a data URI."""
    import markdown

    pictures = {p.name: p for p in facts.evaluation.pictures}

    def embed(line: str) -> str:
        if not (line.startswith("![") and f"]({PICTURE_PREFIX}" in line):
            return line
        alt, _, rest = line[2:].partition("](")
        file = rest.removeprefix(PICTURE_PREFIX).rstrip(")")
        path = pictures.get(file)
        if path is None or not path.is_file():
            return f"*{alt}: not available ({file})*"
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'

    source = "\n".join(embed(line) for line in card_source(facts, linked=False).split("\n"))
    body = markdown.markdown(source, extensions=["tables", "fenced_code"])
    title = html.escape(f"Model card: {facts.params.deploy.model_name}" + (f" v{facts.version}" if facts.version else ""))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 60rem; margin: 1rem auto; padding: 0 1rem;
       color: #1f2328; line-height: 1.45; }}
table {{ border-collapse: collapse; margin: .5rem 0 1rem; }} th, td {{ border: 1px solid #d0d7de; padding: .25rem .6rem; text-align: left; }}
th {{ background: #f6f8fa; }} code {{ background: #f6f8fa; padding: 0 .2rem; border-radius: 3px; }}
pre {{ background: #f6f8fa; padding: .6rem; overflow-x: auto; }} img {{ max-width: 100%; }} figure {{ margin: 1rem 0; }}
figcaption {{ color: #57606a; font-size: .9rem; }} h1 {{ font-size: 1.6rem; }} h2 {{ font-size: 1.25rem; border-bottom: 1px solid #d0d7de; }}
</style></head>
<body>
{body}
</body></html>
"""


def summarise(facts: CardFacts) -> str:
    """The card's opening lines: model, data, test metrics, parity and the gate, in a few sentences."""
    metrics, exported, verdict = facts.evaluation.test, facts.exported, facts.verdict
    gate = verdict.text()
    if len(gate) > MAX_DESCRIPTION // 2:
        gate = gate[: MAX_DESCRIPTION // 2] + " ... (all reasons below)"
    return "\n".join([
        f"**{facts.trained.backbone}** ({facts.trained.strategy}, {facts.trained.image_size}px), "
        f"{len(facts.trained.classes)} classes, data md5 `{facts.data_md5}`.",
        f"{facts.evaluation.test_label.capitalize()}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
        f"ECE {metrics['ece']:.4f}, temperature {facts.evaluation.temperature:.3f} "
        f"(validation accuracy {facts.evaluation.val['accuracy']:.4f}).",
        f"ONNX parity: max |diff| {exported.max_abs_diff:.1e}, top-1 agreement {exported.top1_agreement:.0%}.",
        f"Gate: {gate}",
    ])


def write_model_card(facts: CardFacts, run_dir: Path) -> ModelCard:
    """Render the card into `run_dir/model_card.md` and `run_dir/model_card.html`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path, html_path = run_dir / CARD_NAME, run_dir / CARD_HTML_NAME
    path.write_text(render_card(facts) + "\n")
    html_path.write_text(render_card_html(facts))
    return ModelCard(path, html_path, f"runs:/{facts.run_id}/{CARD_ARTIFACT_DIR}/{CARD_NAME}")
