"""RL Baselines3 Zoo log folders, read whole and without running anything from them.

rl_zoo3 (``train.py`` / ``ExperimentManager``) lays a run out as::

    logs/ALGO/ENV_ID_EXPID/
        ENV_ID.zip                 the final model (best_model.zip, rl_model_*_steps.zip beside it)
        ENV_ID/
            config.yml             the hyperparameters (env_wrapper, frame_stack, normalize, policy_kwargs...)
            args.yml               the command line (env, env_kwargs, seed...)
            vecnormalize.pkl       VecNormalize statistics, when ``normalize`` was set

``enjoy.py --algo ALGO --env ENV_ID -f logs/ --exp-id N`` loads ``logs/ALGO/ENV_ID_N`` (``--exp-id 0``:
the highest N). Both YAML files are ``yaml.dump`` of Python objects (``!!python/object/apply:
collections.OrderedDict``, ``!!python/name:...``): :func:`load_zoo_yaml` reads them with a safe loader
that turns every Python tag into plain data or an inert :class:`PythonTag`, never importing or calling
anything. Python-expression strings (``normalize: "dict(norm_obs=True, norm_reward=False)"``) are
read with :mod:`ast` as literals, never ``eval``-ed. ``vecnormalize.pkl`` goes through the restricted
unpickler of :mod:`edgeq.ingest.vecnormalize`.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeq.envs import WrapperSpec
from edgeq.errors import PolicyFormatError

CONFIG = "config.yml"
ARGS = "args.yml"
VECNORMALIZE = "vecnormalize.pkl"


@dataclass(frozen=True)
class PythonTag:
    """A YAML node tagged as a Python object, kept as data (tag and value), never constructed."""

    tag: str
    value: Any


def load_zoo_yaml(path: Path) -> Any:
    """Parse one of rl_zoo3's YAML files without executing any tag."""
    import yaml

    class ZooLoader(yaml.SafeLoader):
        pass

    def python_tag(loader: ZooLoader, suffix: str, node: yaml.Node) -> Any:
        if isinstance(node, yaml.SequenceNode):
            value: Any = loader.construct_sequence(node, deep=True)
        elif isinstance(node, yaml.MappingNode):
            value = loader.construct_mapping(node, deep=True)
        else:
            value = loader.construct_scalar(node)  # type: ignore[arg-type]
        if suffix == "object/apply:collections.OrderedDict" and isinstance(value, list):
            pairs = value[0] if len(value) == 1 and isinstance(value[0], list) else value
            if all(isinstance(p, list) and len(p) == 2 for p in pairs):
                return {k: v for k, v in pairs}
        if suffix == "tuple" and isinstance(value, list):
            return tuple(value)
        if suffix.startswith("object/new:") and isinstance(value, list) and len(value) == 1 \
                and isinstance(value[0], str):
            return value[0]  # a str subclass such as huggingface_sb3's EnvironmentName
        return PythonTag(suffix, value)

    ZooLoader.add_multi_constructor("tag:yaml.org,2002:python/", python_tag)
    try:
        return yaml.load(path.read_text(), Loader=ZooLoader)  # noqa: S506 - ZooLoader is a SafeLoader
    except yaml.YAMLError as exc:
        raise PolicyFormatError(f"{path}: not readable YAML: {str(exc).splitlines()[0]}") from None


def literal_expression(text: str, where: str) -> Any:
    """A Python expression string the zoo would ``eval``, read as a literal: ``dict(a=1)``, ``[64, 64]``,
    ``nn.ReLU`` (→ the name as a string). Anything that would need code raises, naming ``where``."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise PolicyFormatError(f"{where}: {text!r} is not a Python expression") from None

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
            return {k.arg: value(k.value) for k in node.keywords if k.arg}
        if isinstance(node, (ast.Name, ast.Attribute)):
            return ast.unparse(node)
        if isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(value(e) for e in node.elts)
        if isinstance(node, ast.Dict):
            return {value(k): value(v) for k, v in zip(node.keys, node.values, strict=True) if k is not None}
        return ast.literal_eval(node)

    try:
        return value(tree)
    except (ValueError, TypeError, SyntaxError):
        raise PolicyFormatError(f"{where}: {text!r} is not a literal edgeq can read without running it") from None


@dataclass
class ZooRun:
    """What an RL Zoo run folder says about how its policy was trained and must be run."""

    folder: Path
    archive: Path
    env_id: str
    vecnormalize: Path | None = None
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    wrappers: list[WrapperSpec] = field(default_factory=list)
    frame_stack: int = 0
    normalize: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """For the manifest: what was read from the folder."""
        return {"folder": str(self.folder), "env_id": self.env_id,
                "files": sorted(p.name for p in (self.folder / self.env_id).glob("*") if p.is_file())
                if (self.folder / self.env_id).is_dir() else [],
                "normalize": self.normalize, "env_wrappers": [w.to_json() for w in self.wrappers],
                "frame_stack": self.frame_stack, "env_kwargs": self.env_kwargs}


def is_zoo_folder(path: Path) -> bool:
    """A directory holding ``NAME.zip`` and ``NAME/config.yml`` or ``NAME/args.yml`` (an RL Zoo run)."""
    return path.is_dir() and any((path / z.stem / f).is_file() for z in path.glob("*.zip") for f in (CONFIG, ARGS))


def find_zoo_run(folder: Path, algo: str, env: str, exp_id: int = 0) -> Path:
    """rl_zoo3's ``get_model_path``: ``FOLDER/ALGO/ENV_EXPID`` (``exp_id`` 0: the highest id)."""
    algo_dir = folder / algo
    if not algo_dir.is_dir():
        raise PolicyFormatError(f"{algo_dir}: no such folder (expected rl_zoo3's log layout FOLDER/ALGO/ENV_ID_N; "
                                "check -f/--folder and --algo)")
    if exp_id == 0:
        ids = [int(m.group(1)) for p in algo_dir.iterdir()
               if (m := re.fullmatch(re.escape(env) + r"_(\d+)", p.name)) and p.is_dir()]
        if not ids:
            raise PolicyFormatError(f"{algo_dir}: no run folder {env}_N (found "
                                    f"{sorted(p.name for p in algo_dir.iterdir())[:6]}); check --env")
        exp_id = max(ids)
    run = algo_dir / f"{env}_{exp_id}"
    if not run.is_dir():
        raise PolicyFormatError(f"{run}: no such run folder (check --exp-id; rl_zoo3 numbers runs ENV_ID_1, _2, ...)")
    return run


def _wrappers(value: Any, where: str) -> list[WrapperSpec]:
    """RL Zoo's ``env_wrapper``: a class path, ``{path: kwargs}``, or a list of those."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(WrapperSpec(item))
        elif isinstance(item, dict) and len(item) == 1:
            (path, kwargs), = item.items()
            out.append(WrapperSpec(str(path), dict(kwargs or {})))
        else:
            raise PolicyFormatError(f"{where}: env_wrapper entry {item!r}; expected a class path or "
                                    "{class path: kwargs}")
    return out


def _normalize(value: Any, where: str) -> dict[str, Any] | None:
    if value is None or value is False:
        return None
    if value is True:
        return {"norm_obs": True, "norm_reward": True}
    if isinstance(value, str):
        value = literal_expression(value, f"{where} normalize")
    if not isinstance(value, dict):
        raise PolicyFormatError(f"{where}: normalize is {value!r}; expected true/false or dict(norm_obs=...)")
    return {"norm_obs": True, **value}


def read_zoo_run(folder: Path) -> ZooRun:
    """Read an RL Zoo run folder (``logs/ALGO/ENV_ID_N``)."""
    folder = Path(folder)
    candidates = [z for z in sorted(folder.glob("*.zip")) if (z.with_suffix("")).is_dir()]
    if not candidates:
        zips = sorted(p.name for p in folder.glob("*.zip"))
        raise PolicyFormatError(f"{folder}: not an RL Zoo run folder (expected ENV_ID.zip beside ENV_ID/config.yml; "
                                f"found {zips or 'no .zip'}); pass the .zip itself to quantize it alone")
    archive = candidates[0]
    params = archive.with_suffix("")
    config: dict[str, Any] = {}
    args: dict[str, Any] = {}
    if (params / CONFIG).is_file():
        loaded = load_zoo_yaml(params / CONFIG)
        if not isinstance(loaded, dict):
            raise PolicyFormatError(f"{params / CONFIG}: expected a mapping of hyperparameters")
        config = loaded
    if (params / ARGS).is_file():
        loaded = load_zoo_yaml(params / ARGS)
        if isinstance(loaded, dict):
            args = loaded
    env_id = args.get("env") if isinstance(args.get("env"), str) else archive.stem
    env_kwargs = args.get("env_kwargs") or {}
    if not isinstance(env_kwargs, dict) or any(isinstance(v, PythonTag) for v in env_kwargs.values()):
        raise PolicyFormatError(f"{params / ARGS}: env_kwargs {env_kwargs!r} holds Python objects edgeq does not "
                                "construct; pass --env-kwargs JSON instead")
    if "vec_env_wrapper" in config:
        raise PolicyFormatError(f"{params / CONFIG}: vec_env_wrapper {config['vec_env_wrapper']!r} is not applied by "
                                "edgeq; wrap the env yourself and pass --env module:callable with the policy .zip")
    normalize = _normalize(config.get("normalize"), str(params / CONFIG))
    vn = params / VECNORMALIZE
    if normalize and normalize.get("norm_obs", True) and not vn.is_file():
        raise PolicyFormatError(f"{params / CONFIG}: normalize is set but {vn} is missing; copy it from the training "
                                "machine (the policy expects normalized observations)")
    frame_stack = int(config.get("frame_stack") or 0)
    return ZooRun(folder=folder, archive=archive, env_id=str(env_id), vecnormalize=vn if vn.is_file() else None,
                  env_kwargs=dict(env_kwargs), wrappers=_wrappers(config.get("env_wrapper"), str(params / CONFIG)),
                  frame_stack=frame_stack, normalize=normalize, config=config)
