"""`graft`: the command line.

    graft run [--data DIR] [--params FILE] [--set section.key=value ...] [--summary PATH]
    graft predict --model MODEL FILE...
    graft serve --model models:/NAME@champion [--port P]   # HTTP: POST /predict, GET /health, GET /metadata
    graft promote --name NAME --version V [--reason TEXT]  # the gate's checks, then champion -> V
    graft rollback --name NAME [--reason TEXT]             # champion back to the one before
    graft history --name NAME                              # who moved champion, when, why; ! marks failed versions
    graft bundle --model models:/NAME@champion --out DIR [--format triton]   # ONNX files, labels, card, SHA256SUMS; or a Triton repository
    graft prepare [--data DIR] [--split PATH]     # dvc stage: pull, check and split the data
    graft evaluate [--summary PATH] [--data DIR] [--split PATH] [--out DIR]   # dvc stage: the ONNX model on the held-out split
    graft retrain [--force]                       # train only if data.dvc or the parameters changed
    graft schedule --cron "0 3 * * 1" [--collision enqueue|cancel_new]

`predict` imports onnxruntime only (no torch, no Prefect), so it starts fast
and runs where the training stack is not installed.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import logging
import os
import sys
import threading
from pathlib import Path

from components.core.config import REPO_ROOT, Params, find_params_file, load_params, parse_override
from components.core.errors import ConfigError, GraftError


def _params_file(args: argparse.Namespace) -> Path | None:
    return find_params_file(getattr(args, "params", None))


def _overrides(args: argparse.Namespace) -> list[str]:
    """`--set` values, then `--data` as `data.dir` (it wins)."""
    overrides = list(getattr(args, "set", None) or [])
    if getattr(args, "data", None):
        overrides.append(f"data.dir={Path(args.data).resolve()}")
    return overrides


def _params(args: argparse.Namespace) -> Params:
    """The one way every command reads its parameters: the params file (`--params`, else ./params.yaml,
    else the project's), then `--set` overrides and `--data`."""
    return load_params(_params_file(args), _overrides(args))


def _registry_params(args: argparse.Namespace) -> Params:
    """`_params`, with MLflow pointed at the registry to read: MLFLOW_TRACKING_URI, else the store of `--params`,
    else the project's own store when run inside the project; else one error naming MLFLOW_TRACKING_URI."""
    from components.registry.tracking import consumer_store

    params = _params(args)
    consumer_store(params if getattr(args, "params", None) else None)
    return params


def _prefect_environment(params_file: Path | None) -> None:
    """Embedded Prefect: ephemeral API, home inside the project, telemetry off (unless the user set them)."""
    root = params_file.resolve().parent if params_file else Path.cwd()
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "components")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")


RUN_MODULES = ("flows.training", "flows.runners", "mlflow", "onnxruntime", "torch._dynamo", "mlflow.store.tracking.sqlalchemy_store", "matplotlib.pyplot")
"""What a run imports, imported while the embedded Prefect API starts (which takes longer)."""


def _run(args: argparse.Namespace) -> int:
    from components.data.folders import check_data_folder

    params = _params(args)
    check_data_folder(params.data.dir)  # a missing folder or a file: one line at once, before Prefect starts
    _prefect_environment(_params_file(args))
    from flows.interrupts import stoppable

    def run() -> int:
        from components.choose.candidates import check_candidates
        from components.train.stage import check_unfreeze
        from flows.runners import with_task_runner
        from flows.training import train_flow

        check_candidates(params)  # an unknown backbone: one line, not also Prefect's task and flow failure lines
        check_unfreeze(params)  # likewise a train.unfreeze some candidate cannot meet
        report_dir = Path(args.report).resolve() if args.report else None
        summary = with_task_runner(train_flow)(params, report_dir, _hold(args))  # GRAFT_TASK_RUNNER=dask: where tasks run
        if args.summary:
            summary.write(Path(args.summary))
        print(summary.text(*_next_commands(params, _params_file(args))))
        if args.summary:
            print(f"summary JSON      {Path(args.summary).resolve()}")
        return 0

    return stoppable(run, warm_up=RUN_MODULES)


def _graft() -> str:
    """`graft` as the "next:" lines name it so that it runs from this folder: `graft` where PATH finds this very
    installation's (an activated environment, a container image), else its path (`.venv/bin/graft` in the project)."""
    import shutil

    graft = Path(sys.executable).parent / "graft"
    found = shutil.which("graft")
    if found is not None and Path(found).resolve() == graft.resolve():
        return "graft"
    cwd = Path.cwd().resolve()
    return str(graft.relative_to(cwd)) if graft.is_relative_to(cwd) else str(graft)


def _next_commands(params: Params, params_file: Path | None) -> tuple[str, str]:
    """The `graft` command and the MLflow UI command a run's "next:" lines give, as they work from this folder: the
    project's own `.venv/bin/graft` and `make mlflow-ui` in the project folder; elsewhere, paths that reach this
    installation, with the run's store named where a consumer here would not find it by itself."""
    from components.registry.tracking import TRACKING_URI_ENV, project_params_file, tracking_uri

    def store_of(path: Path | None) -> str | None:
        try:
            return tracking_uri(load_params(path)) if path is not None else None
        except GraftError:  # a params file that does not load here: a consumer would not find the store through it
            return None

    cwd = Path.cwd().resolve()
    command = _graft()
    store = tracking_uri(params)  # MLFLOW_TRACKING_URI when the user set it: a consumer here reads it too
    if store.startswith("sqlite:") and store_of(project_params_file(cwd)) != store:
        command = f"{TRACKING_URI_ENV}={store} {command}"
    project = REPO_ROOT / "params.yaml"
    if store.startswith("sqlite:") and params_file is not None and params_file.resolve() == project.resolve() and store == store_of(project):
        ui = "make mlflow-ui" if cwd == REPO_ROOT.resolve() else f"make -C {REPO_ROOT} mlflow-ui"
    elif store.startswith(("http://", "https://")):  # a server: its own UI, nothing to start
        from components.registry.mlflow_calls import printable_uri

        ui = f"open {printable_uri(store)} in a browser (the MLflow server's UI)"
    else:
        ui = f"{Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {store}"
    return command, ui


def _hold(args: argparse.Namespace) -> str | None:
    """Why this run must not move `champion`: an experiment (`dvc exp run` sets DVC_EXP_NAME) or `--no-promote`."""
    if os.environ.get("DVC_EXP_NAME"):
        return f"a DVC experiment ({os.environ['DVC_EXP_NAME']})"
    return "--no-promote" if args.no_promote else None


def _predict(args: argparse.Namespace) -> int:
    from components.runtime.model import OnnxClassifier

    if not Path(args.model).exists():
        _registry_params(args)  # an MLflow URI: talk to the same store `graft run` wrote to
    model = OnnxClassifier.load(args.model, variant=args.variant)
    logging.getLogger(__name__).info("model %s on %s", model.source.describe(), model.provider)
    failures = 0
    for file in args.files:
        try:
            (prediction,) = model.predict([Path(file)])
            print(json.dumps({"file": file, "label": prediction.label, "score": round(prediction.score, 6)}), flush=True)
        except GraftError as exc:
            failures += 1
            print(json.dumps({"file": file, "error": str(exc)}), flush=True)
    return 1 if failures else 0


def _client():  # noqa: ANN202 - mlflow.MlflowClient
    from mlflow import MlflowClient

    return MlflowClient()


def _serve(args: argparse.Namespace) -> int:
    from components.serve.server import ServeSettings, serve

    params = _params(args) if Path(args.model).exists() else _registry_params(args)  # a file or bundle needs no registry
    def loaded(model) -> None:  # noqa: ANN001 - OnnxClassifier
        print(f"serving {model.source.describe()} at http://{args.host}:{args.port} (POST /predict, GET /health, GET /metadata, "
              "Open Inference Protocol under /v2); Ctrl-C stops it", flush=True)

    serve(args.model, args.host, args.port, ServeSettings.from_params(params, args.variant), loaded)
    return 0


def _promote(args: argparse.Namespace) -> int:
    from components.deploy.promotion import promote

    params = _registry_params(args)
    result = promote(_client(), params, args.name, args.version, args.reason or "promoted with graft promote")
    if not result.moved:
        print(f"{args.name} v{result.version} is already champion; nothing changed")
        return 0
    for check in result.checks:
        print(f"  ok  {check.name}: {check.reason}")
    print(f"champion of {args.name}: {_from_to(result)}")
    _say_what_the_record_says(args.name, result)
    print(f"next:\n  {_graft()} serve --model models:/{args.name}@champion   # or: graft rollback --name {args.name}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from components.deploy.promotion import rollback

    _registry_params(args)
    result = rollback(_client(), args.name, args.reason or "")
    print(f"champion of {args.name}: {_from_to(result)} (rolled back)")
    _say_what_the_record_says(args.name, result)
    print(f"next:\n  {_graft()} history --name {args.name}")
    return 0


def _from_to(result) -> str:  # noqa: ANN001 - components.deploy.promotion.PromotionResult
    return f"{f'v{result.previous}' if result.previous else '(none)'} -> v{result.version}"


def _say_what_the_record_says(name: str, result) -> None:  # noqa: ANN001 - PromotionResult
    """After a move by hand: what the new champion's own record says against it (the gate kept it out), and the test
    accuracy each version was registered with, so a move onto a weaker version is not made blind."""
    from components.registry.versions import recorded_concerns

    client = _client()
    new = client.get_model_version(name, result.version)
    for concern in recorded_concerns(new.tags):
        print(f"  !   v{result.version}: {concern}")
    if result.previous:
        old = client.get_model_version(name, result.previous)
        print(f"  test accuracy as registered: v{result.version} {new.tags.get('test.accuracy', '-')}, v{result.previous} "
              f"{old.tags.get('test.accuracy', '-')} (each on its own run's test images)")


def _history(args: argparse.Namespace) -> int:
    from components.core.lineage import CHAMPION
    from components.registry.history import read_history, unrecorded_champion
    from components.registry.versions import version_concerns

    _registry_params(args)
    client = _client()
    moves = read_history(client, args.name)
    concerns = functools.cache(lambda version: version_concerns(client, args.name, version))
    for move in moves:
        before = f"v{move.previous}" if move.previous else "(none)"
        print(f"{move.when}  {move.alias} {before} -> {move.to_words}  {move.action} by {move.who}: {move.why}")
        for concern in concerns(move.version) if move.alias == CHAMPION and not move.removed else ():
            print(f"    ! v{move.version}: {concern}")
    moved = unrecorded_champion(client, args.name, moves)
    if moved:
        print(f"now                        {CHAMPION} -> v{moved}  moved outside Graft (MLflow UI or API), not yet in the history")
        for concern in concerns(moved):
            print(f"    ! v{moved}: {concern}")
    elif moved == "":
        print(f"now                        {CHAMPION} removed outside Graft (MLflow UI or API), not yet in the history")
    if not moves and moved is None:
        print(f"no recorded alias moves for {args.name}")
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from components.runtime.bundle import bundle_from_registry, triton_from_registry

    params = _registry_params(args)
    if args.format == "triton":
        repo = triton_from_registry(args.model, Path(args.out), args.variant, params.deploy.serve_max_batch)
        print(f"Triton model repository of {repo.name} v{repo.version} ({repo.variant}) written to {repo.root.resolve()}")
        print(f"next:\n  docker run --gpus all -p 8000:8000 -v {repo.root.resolve()}:/models nvcr.io/nvidia/tritonserver:<tag>-py3 "
              "tritonserver --model-repository=/models")
        return 0
    bundle = bundle_from_registry(args.model, Path(args.out))
    print(f"bundle of {bundle.name} v{bundle.version} ({', '.join(bundle.variants)}) written to {bundle.dir.resolve()}")
    print(f"next:\n  (cd {args.out} && sha256sum -c SHA256SUMS)\n  {_graft()} predict --model {args.out} IMAGE...")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from components.data.stage import prepare

    own_data = _data_overridden(args)
    if own_data and args.split is None:
        raise ConfigError(f"{PIPELINE_SPLIT} is the DVC pipeline's split of data.dir as params.yaml sets it; to split other images, "
                          f"name the file: graft prepare {_repeated_options(args)} --split my-split.json")
    result = prepare(_params(args), Path(args.split or PIPELINE_SPLIT))
    print(f"split             {result.train_images} train / {result.val_images} val / {result.test_images} test images, {len(result.classes)} classes, "
          f"data md5 {result.data_md5}")
    print(f"written           {result.split_path.resolve()}")
    if own_data:  # `graft run` splits the same way from the same parameters: the options are what must be repeated
        print(f"next:\n  {_graft()} run {_repeated_options(args)} --summary my-run.json\n"
              f"  {_graft()} evaluate --summary my-run.json --out my-holdout")
    else:
        print(f"next:\n  {_graft()} run --summary outputs/summary.json    # or: dvc repro")
    return 0


PIPELINE_SPLIT = "outputs/split.json"
"""The DVC pipeline's split (stage `prepare`'s output, tracked in git): written only for data.dir as params.yaml sets it."""


def _data_overridden(args: argparse.Namespace) -> bool:
    """Whether the images come from the command line (`--data`, `--set data.dir=...`) rather than the params file."""
    return bool(getattr(args, "data", None)) or any(parse_override(item)[0] == "data.dir" for item in getattr(args, "set", None) or [])


def _repeated_options(args: argparse.Namespace) -> str:
    """The command's own --params, --set and --data, to repeat in the next command it suggests."""
    import shlex

    words = [*(["--params", args.params] if getattr(args, "params", None) else [])]
    words += [word for item in getattr(args, "set", None) or [] for word in ("--set", item)]
    words += ["--data", str(Path(args.data).resolve())] if getattr(args, "data", None) else []
    return shlex.join(words)


def _evaluation_split(args: argparse.Namespace, params: Params) -> tuple[Path, Path]:
    """(the split file, the image folder) `graft evaluate` scores: `--split`, else the split the run itself wrote into its
    folder (the summary names it), else the pipeline's; the images of `--data`/`--set data.dir`, else those the run used."""
    import json

    try:
        summary = json.loads(Path(args.summary).read_text())
    except (OSError, ValueError):
        summary = {}  # evaluate_holdout says what is wrong with it
    recorded = summary.get("data_dir") if isinstance(summary, dict) else None
    data_dir = params.data.dir if _data_overridden(args) or not recorded else _in_project(recorded)
    if args.split:
        return Path(args.split), data_dir
    own = ((summary.get("files") or {}).get("split") if isinstance(summary, dict) else None)
    if own and _in_project(own).is_file():
        return _in_project(own), data_dir
    return Path(PIPELINE_SPLIT), data_dir


def _in_project(path: str) -> Path:
    """A path a summary records: relative ones are inside the project."""
    return Path(path) if Path(path).is_absolute() else REPO_ROOT / path


def _evaluate(args: argparse.Namespace) -> int:
    from components.data.split import read_split
    from components.evaluate.holdout import evaluate_holdout

    params = _params(args)
    split_path, data_dir = _evaluation_split(args, params)
    split = read_split(split_path, data_dir)
    result = evaluate_holdout(params, split, Path(args.summary), Path(args.out), Path(args.model) if args.model else None)
    print(f"ONNX model        {result.onnx_path}")
    print(f"test              accuracy {result.metrics['accuracy']:.4f}, macro-F1 {result.metrics['macro_f1']:.4f} "
          f"(largest gap to the training run's own test metrics {result.max_gap_to_training:.1e})")
    print(f"written           {result.metrics_path.resolve()}, {result.confusion_path.resolve()}")
    if Path(args.out).resolve() == (Path.cwd() / "outputs" / "holdout").resolve():  # the DVC stage's output
        print("next:\n  dvc metrics diff    # against the last commit")
    return 0


def _retrain_inputs(args: argparse.Namespace) -> tuple[Path | None, list[str]]:
    """The params file and overrides a retraining run uses, validated now so mistakes show at once."""
    _params(args)
    params_file = _params_file(args)
    _prefect_environment(params_file)
    return (params_file.resolve() if params_file else None), _overrides(args)


def _retrain(args: argparse.Namespace) -> int:
    from components.data.folders import check_data_folder

    check_data_folder(_params(args).data.dir)
    params_file, overrides = _retrain_inputs(args)
    from flows.interrupts import stoppable

    def retrain() -> int:
        from flows.schedule import retrain_flow

        result = retrain_flow(str(params_file) if params_file else None, overrides, force=args.force)
        print(f"{result['action']}: {result['reason']}")
        if result["summary"]:
            print(result["summary"].text(*_next_commands(_params(args), params_file)))
        return 0

    return stoppable(retrain, warm_up=("flows.schedule", *RUN_MODULES))


def _schedule(args: argparse.Namespace) -> int:
    params_file, overrides = _retrain_inputs(args)
    from prefect import serve
    from prefect.settings import PREFECT_API_URL

    from flows.schedule import retrain_deployment

    deployment = retrain_deployment(
        args.cron, args.collision, str(params_file) if params_file else None, overrides, args.name, args.timezone, args.pool
    )
    if args.pool:
        if not PREFECT_API_URL.value():
            raise ConfigError(
                f"--pool {args.pool} needs a Prefect server that the worker also uses: run `prefect server start` "
                "and export PREFECT_API_URL=http://127.0.0.1:4200/api (or serve it here without --pool)"
            )
        deployment_id = deployment.apply()
        print(f"registered graft-retrain/{args.name} ({deployment_id}) for work pool '{args.pool}': cron '{args.cron}' "
              f"({args.timezone}), one run at a time, collisions {args.collision}")
        print(f"next:\n  prefect worker start --pool {args.pool} --type process\n"
              f"  prefect deployment run graft-retrain/{args.name} --watch    # one run now")
        return 0
    announce = (f"serving graft-retrain/{args.name}: cron '{args.cron}' ({args.timezone}), one run at a time, "
                f"collisions {args.collision}; Ctrl-C stops it")
    from flows.interrupts import EXIT_INTERRUPTED, serving_schedule

    embedded = not PREFECT_API_URL.value()
    if embedded:
        logging.getLogger(__name__).warning(
            "PREFECT_API_URL is not set: the schedule lives only as long as this process, on its own Prefect API; "
            "for a lasting one run `prefect server start` and export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    # embedded: with Prefect's scheduler, which an ephemeral API lacks (it would never create the schedule's runs)
    with serving_schedule(embedded) as stop:
        print(announce, flush=True)
        serve(deployment)
    if stop.signal is None:
        return 0
    print(f"stopped: graft schedule ({stop.signal}); graft-retrain/{args.name} is no longer served", file=sys.stderr)
    return EXIT_INTERRUPTED


def _options() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The option sets commands share: where the parameters come from, and which images."""
    params = argparse.ArgumentParser(add_help=False)
    params.add_argument("--params", metavar="FILE", help="params file (default: ./params.yaml, else the project's)")
    params.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", help="override one parameter; repeatable")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data", metavar="DIR", help="image folder: DIR/<class>/* or DIR/{train,val,test}/<class>/* (default: data.dir, the DVC demo data)")
    return params, data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graft", description="Transfer learning pipeline: choose, fine-tune, evaluate, deploy.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    params, data = _options()

    def command(name: str, handler, help: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:  # noqa: A002, ANN001
        found = sub.add_parser(name, help=help, parents=[params, *parents])
        found.set_defaults(handler=handler)
        return found

    run = command("run", _run, "run the training flow (choose -> fine-tune -> evaluate -> deploy)", data)
    run.add_argument("--summary", metavar="PATH", help="write the run summary as JSON here")
    run.add_argument("--report", metavar="DIR", help="write metrics.json, plots and the ONNX model here (the DVC train stage's outputs)")
    run.add_argument("--no-promote", action="store_true", help="register as challenger only, whatever the gate says (always so under `dvc exp run`)")

    predict = command("predict", _predict, "classify images with an ONNX model (onnxruntime only)")
    predict.add_argument("--model", required=True, help="an .onnx file, a bundle folder or an MLflow URI such as models:/NAME@champion")
    predict.add_argument("files", nargs="+", metavar="FILE")
    predict.add_argument("--variant", default="fp32", help="fp32 (default), optimized, fp16, int8, or auto (fp16 on a GPU, int8 on a CPU, when published)")

    serve = command("serve", _serve, "HTTP service for a model; reloads when its alias moves (onnxruntime only)")
    serve.add_argument("--model", required=True, help="models:/NAME@champion, models:/NAME/V, a bundle folder or an .onnx file")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--variant", default="fp32", help="fp32 (default), optimized, fp16, int8, or auto (fp16 on a GPU, int8 on a CPU)")

    promote = command("promote", _promote, "run the gate's checks on a registered version and make it champion")
    promote.add_argument("--name", required=True, help="registered model name")
    promote.add_argument("--version", required=True, help="version number to promote")
    promote.add_argument("--reason", help="why, for the alias history")

    rollback = command("rollback", _rollback, "move champion back to the version that held it before")
    rollback.add_argument("--name", required=True, help="registered model name")
    rollback.add_argument("--reason", help="why, for the alias history")

    history = command("history", _history, "show who moved champion, when and why")
    history.add_argument("--name", required=True, help="registered model name")

    bundle = command("bundle", _bundle, "write a registered version's deploy bundle (ONNX files, labels, card, checksums)")
    bundle.add_argument("--model", required=True, help="models:/NAME@champion or models:/NAME/V")
    bundle.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder")
    bundle.add_argument("--format", choices=("graft", "triton"), default="graft",
                        help="graft: ONNX files, labels, card, SHA256SUMS (default); triton: a Triton model repository (config.pbtxt, dynamic batching)")
    bundle.add_argument("--variant", default="fp32", help="--format triton: the variant to serve (fp32, optimized, fp16, int8)")

    prepare = command("prepare", _prepare, "pull and check the data, split it, write the split (dvc stage `prepare`)", data)
    prepare.add_argument("--split", metavar="PATH",
                         help=f"where to write the split (default: {PIPELINE_SPLIT}, the DVC pipeline's, for data.dir as params.yaml sets it)")

    evaluate = command("evaluate", _evaluate, "score a run's ONNX model with onnxruntime on the test split (dvc stage `evaluate`)", data)
    evaluate.add_argument("--model", metavar="ONNX", help="the model file (default: the one the summary names)")
    evaluate.add_argument("--summary", default="outputs/summary.json", metavar="PATH", help="the run's summary (default: outputs/summary.json)")
    evaluate.add_argument("--split", metavar="PATH",
                          help=f"the split to score on (default: the one the run wrote into its folder, else {PIPELINE_SPLIT})")
    evaluate.add_argument("--out", default="outputs/holdout", metavar="DIR", help="where metrics.json and confusion.json go")

    retrain = command("retrain", _retrain, "train only if the data or the training parameters changed since the champion", data)
    retrain.add_argument("--force", action="store_true", help="train even when nothing changed")

    schedule = command("schedule", _schedule, "serve the retraining flow on a cron schedule, one run at a time", data)
    schedule.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * 1" (Mondays 03:00)')
    schedule.add_argument("--timezone", default="UTC", help="time zone of the cron expression (default: UTC)")
    schedule.add_argument("--collision", choices=("enqueue", "cancel_new"), default="enqueue",
                          help="a run due while another runs: wait for it (enqueue) or is cancelled (cancel_new)")
    schedule.add_argument("--name", default="graft-retrain", help="deployment name (default: graft-retrain)")
    schedule.add_argument("--pool", metavar="WORK_POOL", help="register the deployment for this work pool (a worker runs it) instead of serving it here")
    return parser


class _UserErrorsInOneLine(logging.Filter):
    """Drop the traceback Prefect logs when a task or flow fails with a `GraftError`.

    Those are problems with the user's input or services, and their message says how to fix
    them; a traceback through Prefect's engine above it only buries that line. Other
    exceptions (bugs) keep their traceback, and `--verbose` keeps every one.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], GraftError):
            record.exc_info = None
            record.exc_text = None
        return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Graft retries each MLflow call itself (components.registry.mlflow_calls), a few seconds in all; MLflow's own HTTP
    # retries on top of that would keep a run waiting for minutes on a server that is gone, and keep `graft serve`
    # reporting a healthy registry for as long
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if not sys.stderr.isatty() or args.command in ("run", "retrain", "schedule"):
        # MLflow draws a progress bar for every download; a run's downloads are the champion's small files
        # (its own log says what it does), and outside a terminal the bar's redraws become lines of clutter
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not args.verbose:
        for noisy in ("alembic", "httpx", "onnx_ir", "onnxscript", "torch.onnx", "mlflow.store.db.utils"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        for engine in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(engine).addFilter(_UserErrorsInOneLine())
    try:
        return args.handler(args)
    except GraftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C where no command handles it (`graft schedule` before Prefect's runner is up, ...)
        print(f"stopped: graft {args.command} was interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except Exception as exc:
        from components.registry.mlflow_calls import explain_auth  # MLflow is imported only by commands that use it

        refused = explain_auth(exc, None, "an MLflow call")  # one the components did not explain themselves
        if refused is None:
            raise
        print(f"error: {refused}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `graft` command: `main`, then the process ends without Python's interpreter teardown.

    After a `graft run` the interpreter holds close to a million objects (torch, onnx, Prefect, MLflow);
    freeing them one by one at exit took 3 s of every run, work the operating system does at once when the
    process ends. Before that, as at any exit, thread pools are told to stop and every non-daemon thread is
    joined, the atexit handlers run (logging's among
    them: log files are flushed and closed) and stdout and stderr are flushed. A command that raised ends
    the usual way, with its traceback.
    """
    code = main()
    threading._shutdown()  # what the interpreter does first at exit: stop thread pools, join non-daemon threads
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


if __name__ == "__main__":
    entry()
