"""A run directory on disk: the profile and code it names, its model.pt, and the model rebuilt from them.

    config.json + profile.yaml + model.pt -> (vet named code) -> prepare the source model
        -> load the trained state and integer widths -> LoadedRun

Everything here reads or writes a run's files; training lives in
:mod:`cgmq_cli.compress`, which writes a run through :func:`save_model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from cgmq_cli import api, atomic, checkpoint, run_files, rundir, safe_load
from cgmq_cli.errors import CheckpointError, UsageError
from cgmq_cli.profiles import HardwareProfile, load_profile, parse_profile
from cgmq_cli.qmodel import QuantizedModel
from cgmq_cli.sanitize import cut

if TYPE_CHECKING:
    from cgmq_cli.compress import CompressSettings

MODEL_FORMAT = "cgmq-model/1"


def resolve_profile(settings: CompressSettings, run_dir: Path | None = None) -> HardwareProfile:
    """The profile, narrowed by the width flags; a run's own copy when rebuilding."""
    if run_dir is not None and (run_dir / "profile.yaml").is_file():
        source = str(run_dir / "profile.yaml")
        profile = parse_profile(safe_load.read_yaml(run_dir / "profile.yaml", source), source)
    else:
        profile = load_profile(settings.profile)
    return profile.narrowed(settings.weight_bits, settings.act_bits)


def code_specs(settings: CompressSettings, arch: str | None, uses: tuple[str, ...] = ("arch", "loss", "data")) -> list[str]:
    """The flags of a saved run that import user code, as ``--arch x.py:Net`` (for the note and the trust check)."""
    specs = {"arch": arch, "loss": settings.loss, "data": settings.data}
    return [f"--{k} {cut(specs[k], 120)}" for k in uses if checkpoint.is_user_code(specs[k])]


def vet_code(run_dir: Path, specs: list[str], trust: bool, notify: Callable[[str], None] | None) -> None:
    """Code named by a run directory is imported only from the user's own, unmoved run, or with --trust-checkpoint."""
    if not specs:
        return
    reason = rundir.untrusted_reason(run_dir)
    if reason and not trust:
        raise UsageError(f"{run_dir} {reason}, and its config.json names code to import ({', '.join(specs)}); "
                         "cgmq does not run code named by a file it cannot vouch for",
                         "read that config.json, then pass --trust-checkpoint on this command line to import it")
    if notify is not None:
        notify(f"note: {rundir.code_note(specs)}")


def save_model(path: Path, qm: QuantizedModel, run_id: str | None = None) -> None:
    """The compressed model: full state (folded weights, steps, gates), the integer widths and the run's id."""
    atomic.save_torch(path, {"format": MODEL_FORMAT, "state_dict": qm.gm.state_dict(), "widths": qm.widths(),
                             "bits": {k: list(v) for k, v in qm.bits().items()}, "run": run_id})


def profile_yaml(profile: HardwareProfile) -> str:
    """The resolved profile as YAML (reloadable with parse_profile)."""
    import yaml

    from cgmq_cli.profiles import dump_profile

    return yaml.safe_dump(dump_profile(profile), sort_keys=False)


@dataclass(frozen=True)
class LoadedRun:
    run_dir: Path
    settings: CompressSettings
    qm: QuantizedModel
    profile: HardwareProfile
    report: dict


def load_run(run_dir: Path, trust: bool = False, notify: Callable[[str], None] | None = None) -> LoadedRun:
    """Rebuild a finished run's quantized model (architecture from its recipe, state from model.pt).

    Every file is checked before use; code named by config.json is imported as
    :func:`vet_code` allows, a pickled source model only with ``trust`` (given
    on the command line of this invocation; config.json's ``trusted`` is ignored).
    """
    from cgmq_cli import settings as settings_mod

    run_dir = Path(run_dir)
    config = run_files.read_config(run_dir)
    settings = settings_mod.from_config(config["settings"], str(run_dir / "config.json"))
    report = run_files.read_report(run_dir)
    if not (run_dir / "model.pt").is_file():
        raise UsageError(f"{run_dir} has no model.pt: the run did not finish", f"resume it: cgmq compress --resume {run_dir}")
    saved = run_files.read_torch_state(run_dir, "model.pt", {"state_dict": dict, "widths": dict})
    if saved.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{run_dir / 'model.pt'} is not a {MODEL_FORMAT} file", "compress again")
    profile = resolve_profile(settings, run_dir)
    source = config["source"]
    arch = source["arch"] or (source["model"] if source["kind"] == "torchvision" else None)
    vet_code(run_dir, code_specs(settings, arch, ("arch", "data")), trust, notify)
    if source["kind"] in ("state_dict", "torchvision"):
        if not arch:
            raise UsageError(f"{run_dir / 'config.json'} names no architecture for its state_dict",
                             "the run directory was edited; compress again")
        user_state = {k: v for k, v in saved["state_dict"].items() if not k.startswith("cgmq.")}
        model = checkpoint.build_arch(arch, checkpoint.guess_num_classes(user_state) if arch.startswith(checkpoint.TORCHVISION) else None)
    else:
        path = Path(source["model"])
        if not checkpoint.source_unchanged(source):
            raise UsageError(f"the run was made from {path}, which is missing or changed since",
                             "restore the original model file to rebuild this run")
        if source["kind"] == "pickle" and not trust:
            raise CheckpointError(f"the run was made from {path}, a pickled module; rebuilding it unpickles that file, "
                                  "which could run code from it",
                                  "pass --trust-checkpoint on this command line if you trust that file")
        model, _ = checkpoint.load_model(str(path), None, trust)
    qm = api.prepare(model, tuple(config["sample_shape"]), settings.leaves, profile,
                     config.get("sample_dtype", "float32"))
    try:
        qm.gm.load_state_dict(saved["state_dict"])
        qm.set_widths(dict(saved["widths"]))
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{run_dir / 'model.pt'} does not fit this run's model (from another run, or edited): "
                              f"{cut(first, 120)}", "compress again") from None
    return LoadedRun(run_dir, settings, qm, profile, report)
