"""Experts in and out through the peft adapter format, so users can bring LoRAs they already have.

A peft adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``; the tensor
names are those ``peft.get_peft_model_state_dict`` gives (the adapter name removed):

- LoRA: ``base_model.model.<layer path>.lora_A.weight`` ``[r, d_in]`` and ``...lora_B.weight`` ``[d_out, r]``,
  scale ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``);
- (IA)3: ``base_model.model.<layer path>.ia3_l``: ``[d_out, 1]`` scales a layer's output, ``[1, d_in]`` the
  input of a feed-forward layer (``feedforward_modules``);
- prompt tuning: ``prompt_embeddings`` ``[num_virtual_tokens, token_dim]``.

Layer paths are those of the model peft wraps: the backbone's model (``BertModel`` for the encoder family,
``task_type`` ``FEATURE_EXTRACTION``; ``LlamaForCausalLM`` and the like for the causal family, ``CAUSAL_LM``).
Adapters made for a task head wrapper (e.g. ``BertForSequenceClassification``: ``bert.encoder...``) are
mapped onto the bare backbone through its ``base_model_prefix``; their task-head weights are skipped.

peft itself is not needed here: the format is JSON and safetensors. Pickled ``adapter_model.bin`` files are
refused.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checks import check_weights
from .io import MtpeftError, make_temp_dir, read_json, read_tensors, write_json, write_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."  # what peft puts before a layer path in a saved adapter
TASK_TYPES = {"encoder": "FEATURE_EXTRACTION", "causal": "CAUSAL_LM"}
PEFT_TYPES = {"lora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING"}  # ours -> peft's
EXPORTABLE = tuple(PEFT_TYPES)

# LoRA options that change the computation in ways an mtpeft LoRA module cannot express.
_LORA_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a trainable bias on lora_B",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets",
    "trainable_token_indices": "trainable token embeddings",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA input pooling",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing inside peft (import the experts one by one instead)",
    "kasa_config": "KaSA",
}

# LoRA initialisations that also rewrite the base weights (the adapter needs that residual base model).
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq")

# Layers a bank never runs: an adapter's weights there change nothing the bank computes.
_UNUSED_LAYERS = ("pooler.dense",)

# ---- layer names ------------------------------------------------------------------------------

def _plain_module_names(model: nn.Module) -> list[str]:
    """Module names as in the unwrapped model: a banked layer counts as the layer it wraps."""
    from .bank import BankedLinear

    out: list[str] = []

    def walk(m: nn.Module, prefix: str) -> None:
        for name, child in m.named_children():
            full = f"{prefix}{name}"
            out.append(full)
            if not isinstance(child, BankedLinear):
                walk(child, full + ".")

    walk(model, "")
    return out


def _linear_layers(bank) -> dict[str, nn.Linear]:
    """Layer path -> the frozen ``nn.Linear`` (the base of a banked layer), heads excluded."""
    from .bank import BankedLinear, is_head

    out = {}
    for name in _plain_module_names(bank.model):
        m = bank.model.get_submodule(name)
        if isinstance(m, BankedLinear):
            m = m.base
        if isinstance(m, nn.Linear) and not is_head(name, bank.family):
            out[name] = m
    return out


def _ends_with_dot(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _ends_with(name: str, pattern: str) -> bool:  # peft's test for feedforward_modules given as a list
    return name.endswith(pattern)


def _name_patterns(sites: list[str], names: list[str], match=_ends_with_dot) -> list[str]:
    """Patterns that select exactly ``sites`` out of ``names``: a layer's short name ('query') where it picks
    exactly the sites of that name, the full path otherwise (e.g. BERT's FFN ``output.dense``, whose short
    name also picks the attention output and the pooler)."""
    by_short: dict[str, list[str]] = {}
    for s in sites:
        by_short.setdefault(s.rsplit(".", 1)[-1], []).append(s)
    out = []
    for short, group in by_short.items():
        picked = {n for n in names if match(n, short)}
        out.extend([short] if picked == set(group) else sorted(group))
    if {n for n in names if any(match(n, p) for p in out)} != set(sites):
        out = sorted(sites)  # a short name reaches further than expected: full paths are exact
    return out


def _path_candidates(path: str, model: nn.Module) -> list[str]:
    """What an adapter's layer path may name in the backbone: itself, or the path across the task-head
    wrapper prefix (``bert.encoder...`` for a classifier's adapter on a bare ``BertModel``; ``layers...``
    for a bare ``LlamaModel``'s adapter on ``LlamaForCausalLM``)."""
    cands = [path]
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        if path.startswith(prefix + "."):
            cands.append(path[len(prefix) + 1:])
        cands.append(f"{prefix}.{path}")
    return cands


def base_model_name_or_path(backbone) -> str | None:
    """The backbone's local directory (the shipped MiniLM: the package's model dir), else its name."""
    config = getattr(backbone.model, "config", None)
    for cand in (getattr(backbone, "source", None), getattr(config, "_name_or_path", None)):
        if cand and Path(str(cand)).is_dir():
            return str(Path(str(cand)).resolve())
    return getattr(backbone, "name", None)


# ---- export -----------------------------------------------------------------------------------

def export_peft(bank, module_name: str, out_dir: str | Path, *, base_model: str | None = None) -> Path:
    """Write module ``module_name`` as a peft adapter directory that
    ``peft.PeftModel.from_pretrained(base_model, out_dir)`` loads. Returns ``out_dir``.

    ``base_model`` overrides the ``base_model_name_or_path`` recorded (by default the backbone's local
    directory). The directory is written atomically; an existing non-empty directory is replaced only if it
    is a peft adapter directory.
    """
    out = Path(os.path.abspath(out_dir))  # "." and "sub/.." name their real directory
    rec = bank.record(module_name)
    if rec.type not in EXPORTABLE:
        hint = "; MPT modules go out as one peft multitask prompt tuning adapter per group with " \
               "mtpeft.mpt.export_peft_mpt" if rec.type == "mpt" else ""
        raise MtpeftError(f"module {module_name!r} is of type {rec.type!r}; the peft format takes the types "
                          f"{', '.join(EXPORTABLE)}{hint}")
    _check_target_dir(out)
    group, j = bank.locate(module_name)
    stacks = list(bank.stacks_of(group))
    family = bank.family
    if family not in TASK_TYPES:
        raise MtpeftError(f"cannot export from a {family!r} backbone; peft export knows {sorted(TASK_TYPES)}")
    config: dict[str, Any] = {
        "peft_type": PEFT_TYPES[rec.type], "task_type": TASK_TYPES[family],
        "base_model_name_or_path": base_model or base_model_name_or_path(bank.backbone),
        "revision": None, "inference_mode": True, "auto_mapping": None, "modules_to_save": None,
    }
    names = _plain_module_names(bank.model)
    sites = [s for s, _ in stacks]
    tensors: dict[str, torch.Tensor] = {}
    if rec.type == "lora":
        cfg = group.config
        config.update(r=cfg.r, lora_alpha=_num(cfg.alpha), lora_dropout=cfg.dropout,
                      target_modules=_name_patterns(sites, names), bias="none", fan_in_fan_out=False,
                      use_rslora=False, use_dora=False, init_lora_weights=True, layers_to_transform=None,
                      layers_pattern=None, rank_pattern={}, alpha_pattern={}, exclude_modules=None,
                      lora_bias=False)
        for site, stack in stacks:
            e = stack.experts[j]
            tensors[f"{PREFIX}{site}.lora_A.weight"] = e.lora_A.detach()
            tensors[f"{PREFIX}{site}.lora_B.weight"] = e.lora_B.detach()
    elif rec.type == "ia3":
        ff = [s for s, st in stacks if st.feedforward]
        targets = _name_patterns(sites, names)
        # peft wants feedforward_modules within target_modules, and tests them with a plain endswith
        ff_pats = [p for p in targets if any(_ends_with_dot(f, p) for f in ff)]
        if {s for s in sites if any(_ends_with(s, p) for p in ff_pats)} != set(ff):
            targets, ff_pats = sorted(sites), sorted(ff)
        config.update(target_modules=targets, feedforward_modules=ff_pats,
                      fan_in_fan_out=False, init_ia3_weights=True, exclude_modules=None)
        for site, stack in stacks:
            v = stack.experts[j].ia3_l.detach()
            tensors[f"{PREFIX}{site}.ia3_l"] = v[None, :] if stack.feedforward else v[:, None]
    else:  # prompt
        (_, stack), = stacks
        mc = bank.model.config
        config.update(num_virtual_tokens=stack.n_tokens, token_dim=stack.hidden, num_transformer_submodules=1,
                      num_attention_heads=getattr(mc, "num_attention_heads", None),
                      num_layers=getattr(mc, "num_hidden_layers", None),
                      # the weights carry the prompt: how it was initialised does not matter to a loader
                      prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
                      tokenizer_name_or_path=None, tokenizer_kwargs=None)
        tensors["prompt_embeddings"] = stack.experts[j].prompt.detach()
    try:
        _write_dir(out, config, tensors)
    except OSError as e:
        raise MtpeftError(f"cannot write the adapter to {out} ({e.strerror or e}); give a directory you can write "
                          "to") from None
    return Path(out_dir)


def _num(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _is_adapter_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file()


def _check_target_dir(out: Path) -> None:
    here = Path.cwd().resolve()
    if out.parent == out or out.resolve() == here or out.resolve() in here.parents:
        raise MtpeftError(f"cannot export into {out}: it is the current directory or one above it (the adapter "
                          "directory is replaced as a whole); give a new directory, e.g. ./MODULE-adapter")
    if out.exists() and not out.is_dir():
        raise MtpeftError(f"{out} exists and is not a directory; export into a new directory")
    if out.is_dir() and any(out.iterdir()) and not _is_adapter_dir(out):
        raise MtpeftError(f"{out} is not empty and is not a peft adapter directory (no {CONFIG_NAME}); "
                          "export into a new or empty directory")


def _write_dir(out: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write into a temporary sibling, then swap it in (the old adapter, if any, is removed last)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, prefix=f".{out.name}.tmp-")  # the umask's mode, not mkdtemp's 0700
    old = None
    try:
        write_tensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        write_json(tmp / CONFIG_NAME, config)
        if out.is_dir() and any(out.iterdir()):  # a peft adapter directory (checked): move it aside
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "adapter")
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old / "adapter", out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ---- import -----------------------------------------------------------------------------------

def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a peft adapter directory; pickled weights are refused."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise MtpeftError(f"peft adapter directory not found: {d}")
    config = read_json(d / CONFIG_NAME, what="peft adapter config")
    if not isinstance(config, dict):
        raise MtpeftError(f"{d / CONFIG_NAME} is not a peft adapter config (a JSON object)")
    w = d / WEIGHTS_NAME
    if not w.is_file():
        if (d / PICKLE_NAME).is_file():
            raise MtpeftError(
                f"{d} holds only {PICKLE_NAME}, a pickle; mtpeft never loads pickles (they can run code). Convert "
                "it to safetensors where you trust the file, e.g. `python -c \"import torch; from safetensors.torch "
                f"import save_file; save_file(torch.load('{d / PICKLE_NAME}', weights_only=True), "
                f"'{w}')\"`, or re-save the adapter with peft's save_pretrained(..., safe_serialization=True)")
        raise MtpeftError(f"{d} has no {WEIGHTS_NAME}; is it a peft adapter directory?")
    _check_config(config, d)
    tensors = read_tensors(w, what="peft adapter weights")
    check_weights(tensors, "peft adapter weights", w)
    return config, tensors


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_names(v) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


# adapter_config.json keys mtpeft reads: what each must be (None is allowed for each)
_CONFIG_TYPES = {
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "lora_alpha": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "lora_dropout": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (lambda v: isinstance(v, dict) and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                           for x in v.values()), "an object of positive integers"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(_is_num(x) and x > 0 for x in v.values()),
                      "an object of positive numbers"),
    "target_modules": (_is_names, "a name or a list of names"),
    "feedforward_modules": (_is_names, "a name or a list of names"),
    "modules_to_save": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of names"),
    "num_virtual_tokens": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "num_transformer_submodules": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "token_dim": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "bias": (lambda v: isinstance(v, str), "a string"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or a string"),
    "base_model_name_or_path": (lambda v: isinstance(v, str), "a string"),
}


def _check_config(config: dict, d: Path) -> None:
    """The keys mtpeft reads have the types peft writes; pattern keys are valid regular expressions."""
    for key, (ok, want) in _CONFIG_TYPES.items():
        v = config.get(key)
        if v is not None and not ok(v):
            raise MtpeftError(f"{d / CONFIG_NAME}: {key} must be {want}, got {str(v)[:80]!r}; fix the file or "
                              "re-save the adapter with peft")
    patterns = [*(config.get("rank_pattern") or {}), *(config.get("alpha_pattern") or {})]
    if isinstance(config.get("feedforward_modules"), str):
        patterns.append(config["feedforward_modules"])
    for pat in patterns:
        try:
            re.compile(pat)
        except (re.error, RecursionError, OverflowError) as e:
            raise MtpeftError(f"{d / CONFIG_NAME}: {pat[:80]!r} is not a valid regular expression ({e}); fix the "
                              "file or re-save the adapter with peft") from None


def import_peft(bank, adapter_dir: str | Path, name: str | None = None, task: str | None = None, *,
                trainable: bool = False) -> str:
    """Add the peft adapter in ``adapter_dir`` (LoRA, (IA)3 or prompt tuning) to ``bank`` as a module of the
    matching type and config, with its weights. Returns the module's name (default: the directory's name).

    The config is validated against the backbone (its target layers exist, the dimensions match); options
    an mtpeft module cannot express (DoRA, per-layer ranks that differ, ...) are refused with the reason.
    """
    d = Path(adapter_dir)
    config, tensors = read_adapter(d)
    peft_type = str(config.get("peft_type", ""))
    ours = {v: k for k, v in PEFT_TYPES.items()}.get(peft_type)
    if ours is None:
        hint = " (multitask prompt tuning: mtpeft.mpt.import_peft_mpt)" if peft_type == "MULTITASK_PROMPT_TUNING" else ""
        raise MtpeftError(f"{d}: peft_type {peft_type or '(missing)'!r} cannot be imported; mtpeft imports "
                          f"{', '.join(PEFT_TYPES.values())} adapters{hint}")
    name = name or d.resolve().name
    from .bank.manifest import check_name

    check_name(name, f"{d}: ")
    heads = _head_tensors(config, tensors)
    if heads:
        warnings.warn(f"{d}: skipping {len(heads)} task-head tensor(s) of modules_to_save (e.g. {heads[0]}); "
                      "a bank scores tasks without per-adapter heads", stacklevel=2)
        tensors = {k: v for k, v in tensors.items() if k not in heads}
    if ours == "prompt":
        mconfig, weights = _prompt_from_peft(bank, config, tensors, d)
    else:
        mconfig, weights = _linear_from_peft(bank, ours, config, tensors, d)
    meta = {"imported_from": {"format": "peft", "path": str(d.resolve()), "peft_type": peft_type,
                              "base_model_name_or_path": config.get("base_model_name_or_path")}}
    bank.add(name, ours, mconfig, task=task, metadata=meta, trainable=trainable)
    try:
        params = bank.module_parameters(name)
        if set(params) != set(weights):  # the config must rebuild exactly the sites the weights cover
            raise MtpeftError(f"{d}: the adapter's layers do not map onto this backbone one to one (missing "
                              f"{sorted(set(params) - set(weights))[:3]}, extra {sorted(set(weights) - set(params))[:3]})")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(weights[k].reshape(p.shape))
        for _, stack in bank.stacks_of(name):
            stack.invalidate()
    except BaseException:
        bank.remove(name)
        raise
    return name


def _head_tensors(config: dict, tensors: dict) -> list[str]:
    """Names of task-head weights (peft's ``modules_to_save``, e.g. a classifier): a bank has no place for them."""
    heads = config.get("modules_to_save") or []
    return sorted(k for k in tensors if any(re.search(rf"(^|\.){re.escape(h)}(\.|$)", k) for h in heads))


def _adapter_sites(bank, tensors: dict, suffixes: tuple[str, ...], d: Path):
    """``({backbone layer: {suffix: tensor}}, {backbone layer: the adapter's name for it})`` from the adapter's
    tensor names, each layer checked to exist in the backbone."""
    layers = _linear_layers(bank)
    by_site: dict[str, dict[str, torch.Tensor]] = {}
    paths: dict[str, str] = {}
    unexpected, unused = [], []
    for key, t in tensors.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None or not key.startswith(PREFIX):
            unexpected.append(key)
            continue
        path = key[len(PREFIX):-len(suffix) - 1]
        cands = _path_candidates(path, bank.model)
        if any(c in _UNUSED_LAYERS for c in cands):
            unused.append(path)
            continue
        site = next((c for c in cands if c in layers), None)
        if site is None and path in dict(bank.model.named_modules()):
            raise MtpeftError(f"{d}: the adapter acts on {path!r}, which a bank does not act on (an output head "
                              "or not an nn.Linear layer); mtpeft can import adapters on the transformer's linear layers")
        if site is None:
            raise MtpeftError(f"{d}: the adapter targets layer {path!r}, which this {bank.family} backbone lacks "
                              f"(its linear layers are e.g. {list(layers)[:4]}); was it trained on another model?")
        by_site.setdefault(site, {})[suffix] = t
        paths[site] = path
    if unexpected:
        raise MtpeftError(f"{d}: unexpected tensor {unexpected[0]!r} in the adapter (expected names like "
                          f"'{PREFIX}<layer>.{suffixes[0]}'); mtpeft cannot import it")
    if unused:
        warnings.warn(f"{d}: skipping the adapter's weights on {sorted(set(unused))}: a bank's outputs (the last "
                      "hidden states) do not pass through it", stacklevel=4)
    if not by_site:
        raise MtpeftError(f"{d}: the adapter holds no weights")
    return by_site, paths, layers


def _pattern_value(patterns: dict, path: str, default):
    """peft's ``rank_pattern``/``alpha_pattern`` lookup for one layer."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _linear_from_peft(bank, ours: str, config: dict, tensors: dict, d: Path):
    if ours == "lora":
        for opt, what in _LORA_UNSUPPORTED.items():
            if config.get(opt):
                raise MtpeftError(f"{d}: the adapter uses {what} ({opt}); mtpeft LoRA modules cannot represent it")
        init = config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise MtpeftError(f"{d}: the adapter was initialised with init_lora_weights={init!r}, which changes the base "
                              "weights, so it only works on that modified base model; convert it to a plain LoRA with "
                              "peft's save_pretrained(..., path_initial_model_for_weight_conversion=...) and import that")
        if config.get("bias", "none") != "none":
            raise MtpeftError(f"{d}: the adapter trains the base layers' biases (bias={config['bias']!r}); "
                              "mtpeft keeps the backbone frozen, so only bias='none' adapters can be imported")
        return _lora_config(config, *_adapter_sites(bank, tensors, ("lora_A.weight", "lora_B.weight"), d), d)
    return _ia3_config(config, *_adapter_sites(bank, tensors, ("ia3_l",), d), d)


def _lora_config(config: dict, by_site: dict, paths: dict, layers: dict, d: Path):
    from .modules.lora import LoRAConfig

    r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora"))
    ranks, scales, weights = {}, {}, {}
    for site, t in by_site.items():
        path = paths[site]
        if "lora_A.weight" not in t or "lora_B.weight" not in t:
            raise MtpeftError(f"{d}: layer {path!r} has only one of lora_A/lora_B")
        A, B = t["lora_A.weight"], t["lora_B.weight"]
        lin = layers[site]
        r = _pattern_value(config.get("rank_pattern"), path, r0)
        alpha = _pattern_value(config.get("alpha_pattern"), path, alpha0)
        if A.dim() != 2 or B.dim() != 2 or A.shape != (r, lin.in_features) or B.shape != (lin.out_features, r):
            raise MtpeftError(f"{d}: layer {path!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; this "
                              f"backbone's {site} ({lin.in_features} -> {lin.out_features}) with rank {r} needs "
                              f"({r}, {lin.in_features}) and ({lin.out_features}, {r}): another model's adapter?")
        ranks[site] = r
        scales[site] = alpha / math.sqrt(r) if rslora else alpha / r
        weights[f"{site}.lora_A"], weights[f"{site}.lora_B"] = A, B
    if len(set(ranks.values())) > 1 or max(scales.values()) - min(scales.values()) > 1e-9 * max(scales.values()):
        raise MtpeftError(f"{d}: the adapter's rank or scale differs between layers (rank_pattern/alpha_pattern: "
                          f"ranks {sorted(set(ranks.values()))}); an mtpeft LoRA module has one rank and one scale")
    r = next(iter(ranks.values()))
    alpha = next(iter(scales.values())) * r  # our scale is alpha / r: rsLoRA's alpha / sqrt(r) becomes exact
    cfg = LoRAConfig(target_modules=_name_patterns(sorted(by_site), sorted(layers)), r=r, alpha=float(alpha),
                     dropout=float(config.get("lora_dropout") or 0.0))
    return cfg, weights


def _ia3_config(config: dict, by_site: dict, paths: dict, layers: dict, d: Path):
    from .modules.ia3 import IA3Config

    ff_spec = config.get("feedforward_modules") or []
    ff, weights = [], {}
    for site, t in by_site.items():
        path, v, lin = paths[site], t["ia3_l"], layers[site]
        is_ff = bool(re.fullmatch(ff_spec, path)) if isinstance(ff_spec, str) else \
            any(path.endswith(p) for p in ff_spec)
        want = (1, lin.in_features) if is_ff else (lin.out_features, 1)
        if tuple(v.shape) != want:
            raise MtpeftError(f"{d}: layer {path!r} has ia3_l {tuple(v.shape)}; this backbone's {site} "
                              f"({lin.in_features} -> {lin.out_features}) as a {'feed-forward' if is_ff else 'scaled-output'}"
                              f" layer needs {want}: another model's adapter, or feedforward_modules do not fit?")
        if is_ff:
            ff.append(site)
        weights[f"{site}.ia3_l"] = v.reshape(-1)
    names, other = sorted(layers), [s for s in by_site if s not in ff]
    ff_pats = _name_patterns(sorted(ff), names) if ff else []
    targets = (_name_patterns(sorted(other), names) if other else []) + ff_pats
    return IA3Config(target_modules=targets, feedforward_modules=ff_pats), weights


def _prompt_from_peft(bank, config: dict, tensors: dict, d: Path):
    from .modules.prompt import PromptConfig

    n = config.get("num_virtual_tokens")
    subs = config.get("num_transformer_submodules") or 1
    hidden = bank.model.get_input_embeddings().weight.shape[1]
    if subs != 1:
        raise MtpeftError(f"{d}: the prompt has {subs} transformer submodules (an encoder-decoder prompt); "
                          "mtpeft backbones take one")
    if config.get("token_dim") not in (None, hidden):
        raise MtpeftError(f"{d}: the prompt's token_dim is {config['token_dim']}, this backbone's hidden size {hidden}")
    if set(tensors) != {"prompt_embeddings"}:
        raise MtpeftError(f"{d}: a prompt-tuning adapter holds one tensor 'prompt_embeddings'; found {sorted(tensors)}")
    P = tensors["prompt_embeddings"]
    if not isinstance(n, int) or n <= 0 or tuple(P.shape) != (n, hidden):
        raise MtpeftError(f"{d}: prompt_embeddings has shape {tuple(P.shape)}; num_virtual_tokens {n!r} on this "
                          f"backbone (hidden size {hidden}) needs ({n}, {hidden})")
    return PromptConfig(n_tokens=n), {"<input>.prompt": P}


__all__ = ["EXPORTABLE", "base_model_name_or_path", "export_peft", "import_peft", "read_adapter"]
