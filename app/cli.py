"""The ``anymodal`` command line: train, submit, eval, finetune, demo, config, plugins, plugin new, doctor, export."""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from ..core.config import compose, load_run_config
from ..core.errors import UserError
from ..core.trainer import NonFiniteLossError
from ..plugins.manager import load_components
from .experiment import experiment_names
from .train import load_config, train

__all__ = ["main"]

log = logging.getLogger("anymodal")


def evaluate(run_dir: str, pictures: Optional[bool] = None) -> dict:
    """Eval of a run folder; one at a URL is fetched into its working copy and gets its ``eval/`` uploaded."""
    from ..core.evaluate import evaluate_run
    from ..core.remote_run import RemoteRun, is_url

    if is_url(run_dir):
        with RemoteRun(str(run_dir)).read(write=["eval"]) as local:
            return evaluate(str(local), pictures)
    cfg = load_run_config(Path(run_dir))
    return evaluate_run(Path(run_dir), load_components(cfg.plugins), pictures)


def _cmd_train(args: argparse.Namespace) -> int:
    from ..core.trainer import Preempted

    if args.config and "=" in args.config:  # `anymodal train --resume a.b=c`: an override, not a config file
        args.overrides, args.config = [args.config, *args.overrides], None
    try:
        folder = train(args.config, args.overrides, args.run_dir, args.resume, args.allow_changes, args.take_over)
    except Preempted as stop:
        where = stop.checkpoint.parent.parent if stop.checkpoint else None
        checkpoint = stop.checkpoint
        if stop.checkpoint and getattr(stop, "run_dir", None):  # a run folder at a URL: resume that
            where, checkpoint = stop.run_dir, f"{stop.run_dir}/checkpoints/last.pt"
        print(f"anymodal train: stopped by signal {stop.signum}; " + (
            f"checkpoint {checkpoint}; resume with: anymodal train --resume --run-dir {where}" if where else
            "no checkpoint was written yet: start the run again"), file=sys.stderr)
        raise
    print(f"finished: {folder}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..core.evaluate import EvalInterrupted

    try:
        summary = evaluate(args.run_dir, False if args.no_pictures else None)
    except EvalInterrupted as stop:
        again = shlex.join(["anymodal", "eval", args.run_dir, *(["--no-pictures"] if args.no_pictures else [])])
        print(f"anymodal eval: {stop}; run it again with: {again}", file=sys.stderr)
        raise
    print(summary["table"])
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ..core.finetune import FinetuneStopped
    from .finetune import finetune

    try:
        folder, results = finetune(args.run_dir, args.overrides, args.out, args.resume)
    except FinetuneStopped as stop:
        again = ["anymodal", "finetune", args.run_dir, *args.overrides, *(["--out", args.out] if args.out else []), "--resume"]
        print(f"anymodal finetune: stopped by signal {stop.signum} after step {stop.step}, checkpointed; "
              f"resume with: {shlex.join(again)}", file=sys.stderr)
        raise
    except FloatingPointError as e:
        print(f"anymodal finetune: stopped: {e}", file=sys.stderr)
        return 3
    test = ", ".join(f"{k} {100 * v:.1f}%" for k, v in results["test"].items())
    print(f"fine-tuned {results['steps']} steps ({'stopped early; ' if results['stopped_early'] else ''}best validation "
          f"{100 * results['val']:.1f}% at step {results['best_step']}); test {test}: {folder}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.experiment:
        return _experiment(args)
    if "=" in args.config:  # `anymodal demo a.b=c`: an override, not a config file
        args.overrides, args.config = [args.config, *args.overrides], "default"
    start = time.perf_counter()
    run_dir = args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = train(args.config, args.overrides, run_dir)
    trained = time.perf_counter() - start
    summary = evaluate(str(folder))
    total = time.perf_counter() - start
    print(f"\n{summary['table']}\n")
    print(f"train {trained:.0f} s, train + eval {total:.0f} s; run folder {folder} "
          f"(eval/ holds the table, loss curve and reconstructions)")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from .experiment import format_rows, load_experiment, run_variant

    spec = load_experiment(args.experiment)
    extra = [a for a in [args.config, *args.overrides] if "=" in a]
    if args.run_dir and "://" in args.run_dir:
        raise UserError("--experiment writes its run folders and table locally: give --run-dir a local folder")
    out = Path(args.run_dir or f"runs/{args.experiment}-{time.strftime('%Y%m%d-%H%M%S')}")
    start, rows = time.perf_counter(), []
    for i, (name, overrides) in enumerate(spec["variants"].items()):
        rows.append(run_variant(name, spec["config"], [*spec["common"], *overrides, *extra], out / f"run{i}"))
        (out / "results.json").write_text(json.dumps(rows, indent=2))
    fields = list(load_run_config(out / "run0").eval.labels)
    table = format_rows(rows, fields)
    (out / "table.md").write_text(table + "\n")
    print(f"\n{table}\n\ntotal {time.perf_counter() - start:.0f} s; run folders under {out}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from .submit import submit

    try:
        submitted = submit(args.config, args.overrides, args.sweep or (), args.run_dir, args.resume)
    except (ValueError, RuntimeError) as e:
        print(f"anymodal submit: error: {e}", file=sys.stderr)
        return 2
    for job, folder in submitted:
        print(f"submitted job {job.job_id}: run folder {folder}; stdout {job.paths.stdout}; stderr {job.paths.stderr}")
    if args.wait:
        failed = 0
        for job, folder in submitted:
            try:
                job.result()
                print(f"job {job.job_id} finished: {folder}")
            except Exception as e:  # submitit re-raises the job's error with its traceback
                failed += 1
                print(f"job {job.job_id} failed: {e}", file=sys.stderr)
        return 1 if failed else 0
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    composed, _ = load_config(args.config, args.overrides)
    print(OmegaConf.to_yaml(composed.cfg, resolve=True), end="")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    modules = list(args.plugin or [])
    if args.config:
        modules += list(compose(args.config, []).cfg.plugins)
    components = load_components(modules)
    print("plugins:")
    for name, origin in components.plugins.items():
        print(f"  {name:<24} {origin}")
    for kind, registry in components.registries.items():
        print(f"{kind}s:")
        for entry in registry:
            print(f"  {entry.name:<24} from {entry.plugin} ({components.versions[entry.plugin]})")
        if not len(registry):
            print("  (none)")
    return 0


def _cmd_plugin_new(args: argparse.Namespace) -> int:
    from .scaffold import new_plugin, next_steps

    try:
        root = new_plugin(args.name, Path(args.dir))
    except ValueError as e:
        print(f"anymodal plugin new: error: {e}", file=sys.stderr)
        return 2
    print(next_steps(root))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import doctor_report

    print(doctor_report())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ..core.remote_run import RemoteRun, is_url

    if not is_url(args.run_dir):
        out = _export(Path(args.run_dir), Path(args.checkpoint) if args.checkpoint else None,
                      Path(args.out) if args.out else None, args.format, args.sensor)
        print(f"exported {out}")
        return 0
    remote = RemoteRun(args.run_dir)
    if args.out and is_url(args.out):
        raise UserError(f"--out {args.out}: export writes a URL only as the run's own export/; leave --out out "
                        "to upload it there, or give a local folder")
    checkpoint = args.checkpoint
    if checkpoint and is_url(checkpoint):  # a file of the run at the URL: the same file in its working copy
        if not checkpoint.startswith(remote.url + "/"):
            raise UserError(f"--checkpoint {checkpoint} is not in the run folder {remote.url}: give a file of it, "
                            "or a local file")
        checkpoint = str(remote.local / checkpoint[len(remote.url) + 1:])
    with remote.read(write=[] if args.out else ["export"]) as local:
        out = _export(local, Path(checkpoint) if checkpoint else None, Path(args.out) if args.out else None, args.format,
                      args.sensor)
    print(f"exported {out if args.out else remote.url + '/' + out.relative_to(local).as_posix()}")
    return 0


def _export(run_dir: Path, checkpoint: Optional[Path], out: Optional[Path], fmt: str = "safetensors",
            sensor: Optional[str] = None) -> Path:
    """A checkpoint's backbone (default the run's last) in format ``fmt`` into ``out`` (default the
    run's export/); the file written. ``sensor``: the scene sensor a graph encodes (default the first)."""
    from ..core import export
    from ..core.build import build_backbone
    from ..core.pretrained import PretrainedEncoder, example_input, load_checkpoint_backbone
    from ..core.runfolder import RunFolder

    folder = RunFolder(run_dir)
    cfg = load_run_config(folder.root)
    backbone = load_checkpoint_backbone(build_backbone(cfg, load_components(cfg.plugins)), checkpoint or folder.last)
    out = out or folder.export
    if fmt == "safetensors":
        return export.export_backbone(backbone, cfg, out)
    if fmt == "timm":
        try:
            report = export.export_timm(backbone, out)
        except ValueError as e:
            raise UserError(str(e)) from None
    else:
        try:
            encoder = PretrainedEncoder(backbone.eval(), str(cfg.modality.name), sensor)
        except KeyError as e:
            raise UserError(f"--sensor {sensor}: {e.args[0]}") from None
        writer = export.export_onnx if fmt == "onnx" else export.export_program
        samples = example_input(cfg, encoder, 3)  # traced on two, checked on all three too
        try:
            report = writer(encoder, tuple(t[:2] for t in samples), out, [samples])
        except ImportError as e:
            raise UserError(str(e)) from None
        except Exception as e:  # the graph capture refusing the model (data-dependent shapes, an op with no export)
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the exporters colour their messages
            reason = next((line for line in text.splitlines() if line.strip()), type(e).__name__)
            raise UserError(f"the {cfg.modality.name} encoder does not export as --format {fmt}: {reason[:300]}") from None
        errors = report["max_abs_error"]
        print(f"checked against the encoder on {len(report['batch_sizes'])} batches (of {', '.join(map(str, report['batch_sizes']))}"
              f" samples): largest absolute error "
              f"{errors['tokens']:.2e} (tokens), {errors['features']:.2e} (features)")
    return Path(out) / report["file"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anymodal", description="Self-supervised pre-training for any sensor.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(s: argparse.ArgumentParser, default: Optional[str] = None) -> None:
        s.add_argument("config", nargs="?" if default else None, default=default,
                       help="config file or packaged config name (e.g. default)")
        s.add_argument("overrides", nargs="*", help="group=name or dotted.key=value")

    s = sub.add_parser("train", help="run a config's recipe")
    s.add_argument("config", nargs="?", help="config file or packaged config name (e.g. default); "
                   "not needed with --resume --run-dir")
    s.add_argument("overrides", nargs="*", help="group=name or dotted.key=value")
    s.add_argument("--run-dir", help="run folder (default: run.out_dir/run.name); a local folder or an fsspec URL "
                   "(s3://bucket/prefix/run)")
    s.add_argument("--resume", action="store_true",
                   help="continue the run folder's last checkpoint, with the config saved in the folder")
    s.add_argument("--allow-changes", action="store_true",
                   help="with --resume: accept overrides that change the run (recorded in config-changes.jsonl)")
    s.add_argument("--take-over", action="store_true",
                   help="a run folder at a URL: take its lock from a run that is gone (another machine's, not yet stale)")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("submit", help="run a config's recipe as a Slurm job (through submitit); --sweep makes a job array")
    with_config(s)
    s.add_argument("--run-dir", help="run folder (default: run.out_dir/run.name); a sweep's runs go in sub-folders")
    s.add_argument("--sweep", action="append", metavar="KEY=V1,V2",
                   help="one job per value (several --sweep: every combination), as one job array")
    s.add_argument("--resume", action="store_true", help="continue the run folder's last checkpoint")
    s.add_argument("--wait", action="store_true", help="wait for the jobs and report how they ended")
    s.set_defaults(func=_cmd_submit)

    s = sub.add_parser("eval", help="linear probe and k-NN of a run's backbone next to random init")
    s.add_argument("run_dir", help="run folder, or its URL (s3://...)")
    s.add_argument("--no-pictures", action="store_true")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("finetune", help="fine-tune a run's backbone with a task head (layer-wise lr decay, early stopping)")
    s.add_argument("run_dir", help="run folder")
    s.add_argument("overrides", nargs="*", help="finetune.KEY=VALUE (and run.device, run.seed, eval.labels, ...)")
    s.add_argument("--out", help="output folder (default: RUN/finetune, or RUN/finetune-scratch with finetune.init=scratch)")
    s.add_argument("--resume", action="store_true", help="continue the output folder's fine-tuning checkpoint")
    s.set_defaults(func=_cmd_finetune)

    s = sub.add_parser("demo", help="pre-train the embedded default, then print the probe table")
    with_config(s, default="default")
    s.add_argument("--run-dir")
    s.add_argument("--experiment", choices=experiment_names(),
                   help="two-stage: the two-stage claim on moving-digit videos (contrastive only, MAE only, two-stage with "
                        "and without token shuffling), probing appearance and motion; two-stage-study: one change at a "
                        "time to the two-stage run (stage-2 targets, learning rate, mask ratio, tubelet size, length)")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("config", help="print the resolved config")
    with_config(s)
    s.set_defaults(func=_cmd_config)

    s = sub.add_parser("plugins", help="list plugins and every registered component")
    s.add_argument("config", nargs="?", help="also load the plugins this config names")
    s.add_argument("--plugin", action="append", help="also load this plugin module")
    s.set_defaults(func=_cmd_plugins)

    s = sub.add_parser("plugin", help="plugin tools: `plugin new NAME` writes a plugin package skeleton")
    plugin_sub = s.add_subparsers(dest="plugin_command", required=True)
    s = plugin_sub.add_parser("new", help="write anymodal-NAME/: entry point, hooks, tokenizer, dataset, a passing test")
    s.add_argument("name", help="the sensor's name, a lower-case identifier (e.g. sonar)")
    s.add_argument("--dir", default=".", help="folder to write the package into (default: .)")
    s.set_defaults(func=_cmd_plugin_new)

    s = sub.add_parser("doctor", help="python, torch, CUDA, optional extras, plugins and the ones that failed to load")
    s.set_defaults(func=_cmd_doctor)

    s = sub.add_parser("export", help="export a checkpoint's backbone (safetensors, onnx, torch.export, timm)")
    s.add_argument("run_dir", help="run folder, or its URL (s3://...)")
    s.add_argument("--format", default="safetensors", choices=["safetensors", "onnx", "torch", "timm"],
                   help="safetensors + config.yaml (anymodal's, the default); onnx (checked with onnxruntime); "
                        "torch (a torch.export program); timm (a timm ViT state dict, image backbones)")
    s.add_argument("--checkpoint", help="checkpoint file (default: the run's last)")
    s.add_argument("--out", help="output folder (default: the run's export/)")
    s.add_argument("--sensor", help="onnx/torch of a multi-sensor (scene) run: the sensor to encode (default: the first)")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("shards", help="shard tools: `shards write CONFIG --out DIR` writes a config's dataset as shards")
    shards_sub = s.add_subparsers(dest="shards_command", required=True)
    s = shards_sub.add_parser("write", help="write data.train and data.test as webdataset shards with a manifest")
    with_config(s)
    s.add_argument("--out", required=True, help="folder or fsspec URL (s3://bucket/prefix); each split in a sub-folder")
    s.add_argument("--split", default="train,test", help="train, test or train,test (default)")
    s.add_argument("--shard-size", default="64MB", help="target bytes per shard (default 64MB)")
    s.add_argument("--workers", type=int, default=1, help="processes writing shards (default 1)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_shards_write)
    return p


def _cmd_shards_write(args: argparse.Namespace) -> int:
    from .shards import cmd_write

    return cmd_write(args)


def _message(error: BaseException) -> str:
    """The user's error message; torch's DataLoader rebuilds a worker's error with the worker's whole
    traceback as its message: keep only the error's own last line."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    # overrides may follow options (train cfg --resume a.b=1): collect key=value leftovers
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (UserError, FileExistsError, FileNotFoundError) as e:
        print(f"anymodal {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"anymodal {args.command}: stopped: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
