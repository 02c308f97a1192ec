"""`posttrain`: one command for the pipeline, its stages, evaluation, the gate and the UI.

    posttrain --help
    posttrain run                          # the whole pipeline (Prefect flow over DVC stages)
    posttrain run --profile full -S sft.training.learning_rate=1e-4
    posttrain stage sft                    # one stage (what `dvc repro` runs)
    posttrain eval models/sft              # evaluate any model folder
    posttrain gate                         # exit 1 unless the last candidate was promoted
    posttrain gc --keep 3                  # delete old registered versions and unused DVC cache (asks first)
    posttrain ui                           # MLflow UI on the local store
    posttrain params rl.hybrid             # each params field's type, default, allowed values and help

Argument parsing and dispatch; the servers `ui` and `serve` start, and their stopping, are in
posttrain/cli/servers.py.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from posttrain.config.schema import ConfigError
from posttrain.pipeline.preflight import update_params_file
from posttrain.release.gate import GateRefused
from posttrain.io import DataError
from posttrain.pipeline.lifecycle import Stopped, WorkspaceBusy
from posttrain.release.tracking import RegistryError


def _quiet_env(args) -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # Prefect's temporary server gets 20 s to start by default: not enough on 2 busy cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if getattr(args, "quiet", False):
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    from posttrain.pipeline import console

    if getattr(args, "verbose", False):  # stages run by dvc inherit it
        os.environ[console.VERBOSE_ENV] = "1"
    console.quiet_libraries()  # known library noise, at its loggers and warning filters (not with -v)


def cmd_run(args) -> int:
    from posttrain.pipeline import prefect_api
    from posttrain.pipeline.lifecycle import stop_on_signals, workspace_lock
    from posttrain.pipeline.summary import render

    wait = None if args.wait is not None and args.wait < 0 else args.wait
    # The lock comes first: a second run must not rewrite params.yaml under a run that is reading it.
    with workspace_lock(".", wait=wait), stop_on_signals(forward_to_children=False):
        update_params_file(Path("params.yaml"), args.profile, args.set or [])
        # A Prefect server that a Ctrl-C to the terminal's process group does not stop (posttrain/pipeline/prefect_api.py)
        prefect_api.ensure_api(Path(os.environ["PREFECT_HOME"]))
        from posttrain.pipeline.flow import StageFailed, pipeline

        try:
            result = pipeline(root=".", run_name=args.run_name)
        except StageFailed as err:
            print(f"error: {err}; later stages did not run, the MLflow run is FAILED", file=sys.stderr)
            return 1
    print(render(result))
    return 0


def stop_report(command: str, stop: Stopped) -> str:
    """What a stopped command prints: what stopped, which MLflow runs are KILLED, how to resume (3 lines at most)."""
    from posttrain.pipeline.lifecycle import progress

    if command != "run":
        return f"posttrain {command}: {stop}; its MLflow runs are marked KILLED"
    done = progress()
    stage, run_id = done.get("stage"), done.get("run_id")
    killed = (f"marked KILLED: MLflow run {run_id} (the pipeline)" + (f" and its '{stage}' stage run" if stage else "")
              if run_id else "no MLflow run was running")
    return (f"posttrain run: {stop}" + (f" during stage '{stage}'" if stage else "") + f"\n{killed}\n"
            "resume with `posttrain run`: finished stages are reused, sft and rl (grpo, draft) go on from their last "
            "checkpoint")


def cmd_stage(args) -> int:
    from posttrain.training import distributed
    from posttrain.pipeline.runner import run_stage
    from posttrain.pipeline.graph import get

    # Training stages under a multi-process launcher: every rank runs this command again (see posttrain/training/distributed.py).
    launcher = args.launcher or os.environ.get(distributed.LAUNCHER_ENV, "")
    if launcher and get(args.name).data_parallel and not distributed.launched():
        return distributed.relaunch(launcher, args.name, quiet=args.quiet)
    if os.environ.get(distributed.LAUNCHED_ENV) and distributed.world_size() == 1:
        print("warning: the launcher started one process only (without a GPU `accelerate launch --num_processes N` "
              "needs --multi_gpu or configs/accelerate/cpu_ddp.yaml)", file=sys.stderr)
    from posttrain.pipeline.lifecycle import stop_on_signals

    with stop_on_signals(forward_to_children=False):  # SIGTERM: the stage's MLflow run ends KILLED
        run_stage(args.name, importlib.import_module(f"posttrain.stages.{get(args.name).module}"))
    return 0


def cmd_dvc_yaml(args) -> int:
    from posttrain.pipeline.graph import write_dvc_yaml

    print(f"wrote {write_dvc_yaml('.')}")
    return 0


def cmd_params(args) -> int:
    from posttrain.config.schema import help_text

    text = help_text(args.prefix)
    if not text:
        raise ConfigError(f"no params section or field '{args.prefix}' (posttrain params lists them all)")
    print(text)
    return 0


def cmd_eval(args) -> int:
    import json

    from posttrain.config.loader import load_params
    from posttrain.evaluation.evaluator import evaluate, load_model
    from posttrain.io import read_jsonl, write_jsonl
    from posttrain.tasks import registry

    params = load_params("params.yaml", overrides=args.set or [])
    task = registry.get(params.data.task)
    if args.model.startswith("models:/"):  # a registered version: this workspace's registry unless MLFLOW_TRACKING_URI
        import mlflow

        from posttrain.release.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri("."))
    model, tokenizer = load_model(args.model, params.eval.dtype)
    questions = read_jsonl(args.questions)
    task.check_eval_records(questions)  # malformed items: one line naming file:line, before any generation
    context = task.make_context(params, args.judge)
    metrics, records = evaluate(model, tokenizer, questions, params.eval, progress=not args.quiet, task=task,
                                context=context, params=params)
    if args.records:
        write_jsonl(args.records, records)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_gc(args) -> int:
    import mlflow

    from posttrain.pipeline import gc
    from posttrain.config.loader import load_params
    from posttrain.pipeline.lifecycle import workspace_lock
    from posttrain.release.tracking import tracking_uri

    if args.keep < 0:
        raise ConfigError(f"--keep must be >= 0, got {args.keep}")
    name = args.name or load_params("params.yaml").promote.registered_model
    mlflow.set_tracking_uri(tracking_uri("."))
    client = mlflow.MlflowClient()
    with workspace_lock(".", wait=0):  # not under a running pipeline: its outputs are not in dvc.lock yet
        listed = gc.plan(client, name, args.keep)
        print(gc.render(listed))
        if listed.empty:
            print("nothing to delete")
            return 0
        if not args.yes:
            try:
                answer = input("delete these? [y/N] ")
            except EOFError:
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return 1
        done = gc.execute(client, listed, args.keep)
    print(f"deleted {len(done.delete)} registered versions, {len(done.caches)} local downloads and "
          f"{len(done.objects)} DVC cache objects ({sum(size for _, size in done.objects) / 1e6:.1f} MB)")
    return 0


def cmd_gate(args) -> int:
    from posttrain.io import read_json

    path = Path(args.report)
    if not path.exists():
        print(f"error: {path} not found: run the pipeline (posttrain run) first", file=sys.stderr)
        return 2
    decision = read_json(path)
    verdict = "PROMOTED" if decision.get("promote") else "REJECTED"
    print(f"gate: {verdict} model version {decision.get('model_version')} vs {decision.get('baseline')}: {decision.get('reason')}")
    return 0 if decision.get("promote") else 1


def cmd_summary(args) -> int:
    from posttrain.pipeline.summary import collect, render, show

    print(show(".", args.show) if args.show else render(collect(".")))
    return 0


def cmd_ui(args) -> int:
    from posttrain.cli import servers
    from posttrain.release.tracking import tracking_uri

    uri = args.backend_store_uri or tracking_uri(".")
    command = servers.mlflow_server_command(uri, args.host, args.port, args.workers, args.artifacts_destination,
                                            args.auth)
    url = servers.runs_url(args.host, args.port, args.backend_store_uri)
    print(f"MLflow server for {uri}; the runs: {url} (Ctrl-C stops it)", flush=True)
    return servers.serve_until_stopped(command, "MLflow server")


def cmd_compare(args) -> int:
    from posttrain.release.compare import compare, load_side
    from posttrain.config.loader import load_params
    from posttrain.release.tracking import setup

    params = load_params("params.yaml", overrides=args.set or [])
    if any(spec.startswith("models:/") for spec in (args.a, args.b)):
        setup(".")  # the registry of this workspace's tracking store (MLFLOW_TRACKING_URI if set)
    a, b = load_side(args.a, params), load_side(args.b, params)
    cfg = params.promote
    print(compare(a, b, cfg.metric, cfg.confidence, cfg.n_bootstrap, params.seed, show=args.show))
    return 0


def _deployment_parameters(args) -> dict:
    """The flow's parameters for a deployment: the workspace, and -S overrides validated now."""
    from posttrain.config.loader import load_params
    from posttrain.pipeline.preflight import validate_workspace

    overrides = args.set or []
    validate_workspace(".")
    load_params("params.yaml", overrides=overrides, build_library_configs=True)  # a bad -S fails here, not at 2 am
    return {"root": getattr(args, "root", None) or str(Path(".").resolve()), "overrides": overrides}


def _one_run_at_a_time():
    """A deployment's concurrency limit: an overlapping scheduled run queues instead of failing on the lock."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    return ConcurrencyLimitConfig(limit=1, collision_strategy="ENQUEUE")


def cmd_serve(args) -> int:
    import contextlib

    from posttrain.cli import servers

    parameters = _deployment_parameters(args)
    with contextlib.ExitStack() as stack:
        if not os.environ.get("PREFECT_API_URL"):
            # Before prefect is imported: its settings (and the flow runs serve starts) read the variable.
            os.environ["PREFECT_API_URL"] = stack.enter_context(servers.local_prefect_server())
        from posttrain.pipeline.flow import pipeline

        print(f"serving deployment '{args.name}' with cron '{args.cron}' (Ctrl-C to stop)", flush=True)
        # Returns inside the stack: a stopped schedule ends its flow runs before the local server goes.
        return servers.serve_until_signalled(lambda: pipeline.serve(
            name=args.name, cron=args.cron, parameters=parameters, global_limit=_one_run_at_a_time()))


def cmd_deploy(args) -> int:
    import posttrain.pipeline.flow
    from posttrain.pipeline.flow import pipeline

    parameters = _deployment_parameters(args)
    # The flow's code: the checkout (posttrain/pipeline/flow.py) is imported from by default (process workers on this machine),
    # or a git URL / bucket that a Docker or Kubernetes worker pulls.
    source = args.source or str(Path(posttrain.pipeline.flow.__file__).resolve().parents[2])
    flow = pipeline.from_source(source=source, entrypoint="posttrain/pipeline/flow.py:pipeline")
    deployment_id = flow.deploy(name=args.name, work_pool_name=args.pool, cron=args.cron, image=args.image,
                                build=False, push=False, parameters=parameters, print_next_steps=False,
                                concurrency_limit=_one_run_at_a_time())
    print(f"deployment 'posttrain-pipeline/{args.name}' ({deployment_id}) on work pool '{args.pool}'"
          f"{' with cron ' + repr(args.cron) if args.cron else ''}; start a worker: "
          f"prefect worker start --pool {args.pool}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only (for CI)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print every stage's whole output and the libraries' logs (default: one line per stage, "
                             "the rest in .posttrain/logs/)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the whole pipeline (Prefect flow; DVC skips unchanged stages)")
    run.add_argument("--profile", help="merge profiles/<name>.yaml into params.yaml first (full, tiny, "
                                       "assignment_reinforce; params.yaml as shipped is the quick profile)")
    run.add_argument("-S", "--set", action="append", metavar="KEY=VALUE",
                     help="write a params.yaml value first, e.g. -S sft.training.learning_rate=1e-4 (repeatable; "
                          "`posttrain params` lists the keys)")
    run.add_argument("--run-name", help="name of the parent MLflow run")
    run.add_argument("--wait", nargs="?", type=float, const=-1.0, default=0.0, metavar="SECONDS",
                     help="if another run holds this workspace, wait for it (for SECONDS, or without a limit) "
                          "instead of refusing at once")
    run.set_defaults(func=cmd_run)

    stage = sub.add_parser("stage", help="run one stage now (what dvc.yaml's commands call)")
    from posttrain.pipeline.graph import BY_NAME

    stage.add_argument("name", choices=list(BY_NAME), help="stage to run")
    stage.add_argument("--launcher", metavar="COMMAND",
                       help="run a training stage (sft, rl) on several processes/GPUs under this launcher, e.g. "
                            "'accelerate launch --config_file configs/accelerate/ddp.yaml' (default: $POSTTRAIN_LAUNCHER; "
                            "other stages ignore it)")
    stage.set_defaults(func=cmd_stage)

    prm = sub.add_parser("params", help="every params.yaml field (not the library sections' own fields) with its "
                                        "type, default, allowed values and help, from posttrain/config/schema.py")
    prm.add_argument("prefix", nargs="?", default="", help="only this section or field, e.g. rl.hybrid or eval.dtype")
    prm.set_defaults(func=cmd_params)

    dvc_yaml = sub.add_parser("dvc-yaml", help="regenerate dvc.yaml from posttrain/pipeline/graph.py")
    dvc_yaml.set_defaults(func=cmd_dvc_yaml)

    ev = sub.add_parser("eval", help="greedy evaluation of a model folder on the task's items (data.task) under "
                                     "params.yaml's eval protocol")
    ev.add_argument("model", help="a model folder (plain, or an adapter folder such as models/rl) or a registered "
                                  "version: models:/<name>/<version> or models:/<name>@<alias>")
    ev.add_argument("--questions", default="data/prepared/test.jsonl",
                    help="JSONL of the task's prepared items, e.g. question/answer for gsm8k (default: %(default)s)")
    ev.add_argument("--judge", default="models/judge",
                    help="the judge model folder, for tasks judged by a model (style) (default: %(default)s)")
    ev.add_argument("--records", help="write per-question records to this JSONL file")
    ev.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", help="override an eval param for this call only")
    ev.set_defaults(func=cmd_eval)

    gc = sub.add_parser("gc", help="delete registered versions but the champion and the last N, and DVC cache "
                                   "entries the workspace does not use, after confirming")
    gc.add_argument("--keep", type=int, default=3, metavar="N",
                    help="newest versions to keep besides those holding an alias (default: %(default)s)")
    gc.add_argument("--yes", action="store_true", help="delete without asking (without it, a 'no' exits 1)")
    gc.add_argument("--name", help="registered model (default: promote.registered_model from params.yaml)")
    gc.set_defaults(func=cmd_gc)

    gate = sub.add_parser("gate", help="print the last gate decision; exit 0 if promoted, 1 if rejected")
    gate.add_argument("--report", default="reports/promotion.json", help="decision file (default: %(default)s)")
    gate.set_defaults(func=cmd_gate)

    comp = sub.add_parser("compare", help="two models on the same items, paired: table, bootstrap interval, McNemar "
                                          "p, the items where they differ")
    comp.add_argument("a", help="eval report folder, model folder, or models:/<name>/<version> | models:/<name>@<alias>")
    comp.add_argument("b", help="the same kinds as A")
    comp.add_argument("--show", type=int, default=5, metavar="N", help="items where they differ to print (default: %(default)s)")
    comp.add_argument("-S", "--set", action="append", metavar="KEY=VALUE",
                      help="override a param for this call only (promote.metric, eval settings for model folders)")
    comp.set_defaults(func=cmd_compare)

    summ = sub.add_parser("summary", help="print the summary of the last run from reports/")
    summ.add_argument("--show", type=int, default=0, metavar="N",
                      help="instead, print the first N items side by side: input, reference, and the base, SFT and "
                           "RL replies, each with its verdict (pass/fail or score, and why a reply failed)")
    summ.set_defaults(func=cmd_summary)

    serve = sub.add_parser("serve", help="serve the pipeline as a Prefect deployment on a cron schedule")
    serve.add_argument("--cron", default="0 2 * * *", help="schedule in cron syntax (default: %(default)s, nightly)")
    serve.add_argument("--name", default="nightly", help="deployment name (default: %(default)s)")
    serve.add_argument("-S", "--set", action="append", metavar="KEY=VALUE",
                       help="params.yaml value every scheduled run writes first (repeatable); the rest comes from params.yaml")
    serve.set_defaults(func=cmd_serve)

    deploy = sub.add_parser("deploy", help="register the pipeline on a Prefect work pool (a worker runs it)")
    deploy.add_argument("--pool", required=True, help="work pool name (process, docker or kubernetes type)")
    deploy.add_argument("--name", default="retrain", help="deployment name (default: %(default)s)")
    deploy.add_argument("--cron", help="optional schedule in cron syntax (default: runs only when triggered)")
    deploy.add_argument("--source", help="where workers get the flow code: a folder or git URL (default: this checkout)")
    deploy.add_argument("--image", help="container image for docker/kubernetes work pools (used as is, not built)")
    deploy.add_argument("--root", help="workspace as the worker sees it; '.' = the run's working directory, "
                                       "e.g. the cloned --source (default: this folder)")
    deploy.add_argument("-S", "--set", action="append", metavar="KEY=VALUE",
                        help="params.yaml value every run writes first (repeatable)")
    deploy.set_defaults(func=cmd_deploy)

    ui = sub.add_parser("ui", help="MLflow UI and tracking server, local store by default (127.0.0.1 only by default)")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    ui.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")
    ui.add_argument("--backend-store-uri", help="tracking database, e.g. postgresql://user@db/mlflow (default: the local store)")
    ui.add_argument("--artifacts-destination", help="where the server stores logged artifacts, e.g. s3://bucket/mlflow")
    ui.add_argument("--auth", action="store_true", help="require a user and password (MLflow basic-auth app)")
    ui.add_argument("--workers", type=int, default=1, help="server processes (default: %(default)s; more for a team server)")
    ui.set_defaults(func=cmd_ui)
    return parser


def _record_refusal(err: Exception) -> None:
    """Under the flow (a stage run by `dvc repro`): say that the stage refused its input, which no retry changes.
    A registry error may be the network's, so it stays retryable."""
    from posttrain.pipeline import console

    target = os.environ.get(console.STAGE_REFUSED_ENV)
    if target and isinstance(err, (ConfigError, DataError, GateRefused, FileNotFoundError)):
        from posttrain.io import write_json

        write_json(Path(target), {"error": type(err).__name__, "message": str(err)})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_env(args)
    try:
        return args.func(args)
    except (ConfigError, DataError, GateRefused, FileNotFoundError, RegistryError, WorkspaceBusy) as err:
        # Known input problems: one line that names what and where, no traceback.
        print(f"error: {err}", file=sys.stderr)
        _record_refusal(err)
        return 2
    except Stopped as stop:
        print(stop_report(args.command, stop), file=sys.stderr)
        return 128 + stop.signum


if __name__ == "__main__":
    sys.exit(main())
