"""The model card: one Markdown page per registered version, and its summary for the registry.

The card is written before the version is registered (it needs the parity
result and the gate's verdict, both known by then) and logged to the run at
`model_card/model_card.md`; the version's description is its summary, set in
the same call that creates the version. Pictures are linked relative to the
card, as the run's `evaluate/` artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from components.backbones.spec import BackboneSpec
from components.backbones.zoo import get_spec
from components.core.config import Params
from components.data.split import Split
from components.data.versions import dvc_file_for
from components.deploy.export import ExportResult
from components.evaluate.gate import Verdict
from components.evaluate.stage import EvalResult
from components.train.stage import TrainResult

CARD_ARTIFACT_DIR = "model_card"


CARD_NAME = "model_card.md"


REPORT_ARTIFACT_DIR = "evaluate"


# MLflow stores a version's description in a 5000-character column.
MAX_DESCRIPTION = 4000


@dataclass(frozen=True)
class ModelCard:
    """The card on disk, where the run keeps it, and the short form for the version's description."""

    path: Path
    uri: str
    summary: str


@dataclass(frozen=True)
class CardFacts:
    """Everything a card says, gathered by deploy once export and gate are done."""

    params: Params
    split: Split
    trained: TrainResult
    evaluation: EvalResult
    exported: ExportResult
    verdict: Verdict
    data_md5: str
    commit: str
    run_id: str

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
        f"- **Folder:** `{split.root}`; split by {split.source} ({split.settings.describe()})",
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
        f"- **Backbone:** `{spec.name}` ({spec.family}, {spec.params_m:.1f}M parameters, "
        f"{'ImageNet pre-trained' if spec.pretrained else 'randomly initialised'})",
        f"- **Weights source:** {spec.weights_source}",
        *_weights_lines(spec),
        f"- **Licence:** {spec.licence}",
        f"- **Strategy:** `{trained.strategy}`; {trained.epochs_run} epochs run, best epoch {trained.best_epoch} "
        f"(validation loss {trained.best_val_loss:.4f})",
        f"- **Input:** uint8 RGB, N x {trained.image_size} x {trained.image_size} x 3; scaling and normalisation "
        f"(mean {[round(m, 4) for m in spec.mean]}, std {[round(s, 4) for s in spec.std]}) are inside the graph",
        f"- **Output:** probabilities over the {len(trained.classes)} classes, softmax temperature {calibrated}",
        "",
        "Hyper-parameters (`train` in params.yaml):",
        "",
        *_table(("parameter", "value"), [(f"`{k}`", v) for k, v in facts.params.train.model_dump(mode="json").items()]),
        "",
    ]


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
        lines.append(f"![{picture.stem.replace('_', ' ')}](../{REPORT_ARTIFACT_DIR}/{picture.name})")
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


def _export_section(facts: CardFacts) -> list[str]:
    exported, cfg = facts.exported, facts.params.deploy
    return [
        "## ONNX export and parity",
        "",
        f"- **File sha256:** `{exported.sha256}` (opset {exported.opset})",
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
        f".venv/bin/graft predict --model models:/{facts.params.deploy.model_name}@challenger IMAGE...",
        "```",
        "",
    ]
    if dirty:
        lines += [f"The run was made with uncommitted changes on top of `{commit}`; they are not in that commit.", ""]
    lines += ["Parameters of this run:", "", "```yaml", params_yaml, "```", ""]
    return lines


def render_card(facts: CardFacts) -> str:
    """The whole card as Markdown."""
    name = facts.params.deploy.model_name
    head = [
        f"# Model card: {name}",
        "",
        summarise(facts),
        "",
        f"MLflow run `{facts.run_id}`, git commit `{facts.commit}`. Model artifact: `runs:/{facts.run_id}/model`.",
        "",
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
    sections = (_data_section, _model_section, _metrics_section, _gate_section, _export_section, _reproduce_section)
    body = [line for section in sections for line in section(facts)]
    return "\n".join([*head, *body, *limits])


def summarise(facts: CardFacts) -> str:
    """A few lines for the registry's version description (rendered as Markdown by the MLflow UI)."""
    metrics, exported, verdict = facts.evaluation.test, facts.exported, facts.verdict
    gate = verdict.text()
    if len(gate) > MAX_DESCRIPTION // 2:
        gate = gate[: MAX_DESCRIPTION // 2] + " ... (all reasons in the model card)"
    return "\n".join([
        f"**{facts.trained.backbone}** ({facts.trained.strategy}, {facts.trained.image_size}px), "
        f"{len(facts.trained.classes)} classes, data md5 `{facts.data_md5}`.",
        f"{facts.evaluation.test_label.capitalize()}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
        f"ECE {metrics['ece']:.4f}, temperature {facts.evaluation.temperature:.3f} "
        f"(validation accuracy {facts.evaluation.val['accuracy']:.4f}).",
        f"ONNX parity: max |diff| {exported.max_abs_diff:.1e}, top-1 agreement {exported.top1_agreement:.0%}.",
        f"Gate: {gate}",
        f"Model card: `runs:/{facts.run_id}/{CARD_ARTIFACT_DIR}/{CARD_NAME}`",
    ])


def write_model_card(facts: CardFacts, run_dir: Path) -> ModelCard:
    """Render the card into `run_dir/model_card.md`."""
    path = run_dir / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_card(facts) + "\n")
    return ModelCard(path, f"runs:/{facts.run_id}/{CARD_ARTIFACT_DIR}/{CARD_NAME}", summarise(facts))
