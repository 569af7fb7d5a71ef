"""`graft`: the command line.

    graft run [--data DIR] [--params FILE] [--set section.key=value ...] [--summary PATH]
    graft predict --model MODEL FILE...

`predict` imports onnxruntime only (no torch, no Prefect), so it starts fast
and runs where the training stack is not installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from components.errors import GraftError

REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_params() -> Path | None:
    for candidate in (Path.cwd() / "params.yaml", REPO_ROOT / "params.yaml"):
        if candidate.is_file():
            return candidate
    return None


def _prefect_environment(root: Path) -> None:
    """Embedded Prefect: ephemeral API, home inside the project, telemetry off (unless the user set them)."""
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "components")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")


def _run(args: argparse.Namespace) -> int:
    from components.config import load_params

    params_path = Path(args.params) if args.params else _default_params()
    overrides = list(args.set or [])
    if args.data:
        overrides.append(f"data.dir={Path(args.data).resolve()}")
    params = load_params(params_path, overrides)
    _prefect_environment(params_path.resolve().parent if params_path else Path.cwd())

    from components.summary import format_summary
    from flows.training import train_flow

    summary = train_flow(params)
    if args.summary:
        from components.evaluate import write_json

        write_json(Path(args.summary), summary)
    print(format_summary(summary))
    if args.summary:
        print(f"summary JSON      {Path(args.summary).resolve()}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from components.serving import OnnxClassifier

    if not Path(args.model).is_file():
        # an MLflow URI: talk to the same store `graft run` wrote to
        from components.config import load_params
        from components.tracking import tracking_uri, use_tracking_uri

        params_path = Path(args.params) if args.params else _default_params()
        use_tracking_uri(tracking_uri(load_params(params_path)))
    model = OnnxClassifier.load(args.model)
    logging.getLogger(__name__).info("model %s on %s", model.path, model.provider)
    failures = 0
    for file in args.files:
        try:
            (prediction,) = model.predict([Path(file)])
            print(json.dumps({"file": file, "label": prediction.label, "score": round(prediction.score, 6)}), flush=True)
        except GraftError as exc:
            failures += 1
            print(json.dumps({"file": file, "error": str(exc)}), flush=True)
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graft", description="Transfer learning pipeline: choose, fine-tune, evaluate, deploy.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the training flow (choose -> fine-tune -> evaluate -> deploy)")
    run.add_argument("--data", metavar="DIR", help="image folder: DIR/<class>/* or DIR/{train,val}/<class>/* (default: the DVC demo data)")
    run.add_argument("--params", metavar="FILE", help="params file (default: ./params.yaml)")
    run.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", help="override one parameter; repeatable")
    run.add_argument("--summary", metavar="PATH", help="write the run summary as JSON here")
    run.set_defaults(handler=_run)

    predict = sub.add_parser("predict", help="classify images with an ONNX model (onnxruntime only)")
    predict.add_argument("--model", required=True, help="an .onnx file or an MLflow URI such as models:/NAME@champion")
    predict.add_argument("--params", metavar="FILE", help="params file naming the MLflow store (default: ./params.yaml)")
    predict.add_argument("files", nargs="+", metavar="FILE")
    predict.set_defaults(handler=_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if not args.verbose:
        for noisy in ("alembic", "httpx", "onnx_ir", "onnxscript", "torch.onnx", "mlflow.store.db.utils"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except GraftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
