"""MPT modules out to, and in from, peft's multitask prompt tuning format (``MULTITASK_PROMPT_TUNING``).

One adapter directory holds a whole group: ``prompt_embeddings`` ``[n, H]`` (the shared prompt ``P*``),
``prefix_task_cols`` ``[T, n, r]`` (the tasks' ``u``) and ``prefix_task_rows`` ``[T, r, H]`` (their ``v``);
peft computes ``P* * (cols[t] @ rows[t])`` for ``task_ids = t``, as the bank does. Task id ``t`` is the
``t``-th module named; peft's config has no place for names, so ``export_peft_mpt`` returns the order (the
``distil`` report records it).

The shapes match peft's where the modules are one MPT group (same ``n_tokens``, rank and ``P*``) on an
encoder-only or decoder-only backbone (one transformer submodule). peft's causal-LM wrapper passes
``task_ids`` to the prompt; its feature-extraction wrapper (the encoder family) does not (as of peft 0.17-0.21),
so there call ``peft_model.get_prompt(batch_size, task_ids)`` and run the base model on the prompts
prepended to the input embeddings (tests/test_mpt.py does this).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import MtpeftError
from ..interop import TASK_TYPES, _check_target_dir, _write_dir, base_model_name_or_path, read_adapter
from ..modules.mpt import MPTConfig, MultitaskPromptTuning, shared_prompt


def export_peft_mpt(bank, names: list[str], out_dir: str | Path, *, base_model: str | None = None) -> list[str]:
    """Write MPT modules ``names`` (one group) as one peft multitask prompt tuning adapter in ``out_dir``;
    returns ``names``, the task order (peft's ``task_ids`` index it)."""
    names = list(names)
    if not names:
        raise MtpeftError("name at least one MPT module to export")
    if len(set(names)) != len(names):
        raise MtpeftError(f"a module is named twice in {names}; name each task's module once")
    groups = {bank.group_of(n).key for n in names}
    group = bank.group_of(names[0])
    if group.mtype is not MultitaskPromptTuning:
        raise MtpeftError(f"module {names[0]!r} is of type {group.mtype.name!r}; peft's multitask prompt tuning "
                          "format takes MPT modules (type 'mpt')")
    if len(groups) > 1:
        raise MtpeftError(f"modules {names} belong to {len(groups)} MPT groups (another n_tokens, rank or shared "
                          "prompt); peft's format holds one shared prompt: export each group on its own")
    if bank.family not in TASK_TYPES:
        raise MtpeftError(f"cannot export from a {bank.family!r} backbone; peft export knows {sorted(TASK_TYPES)}")
    out = Path(os.path.abspath(out_dir))
    _check_target_dir(out)
    stack = bank.input_stacks[group.key]
    js = [group.members.index(n) for n in names]
    mc = bank.model.config
    config = {
        "peft_type": "MULTITASK_PROMPT_TUNING", "task_type": TASK_TYPES[bank.family],
        "base_model_name_or_path": base_model or base_model_name_or_path(bank.backbone), "revision": None,
        "inference_mode": True, "auto_mapping": None, "num_virtual_tokens": stack.n_tokens,
        "token_dim": stack.hidden, "num_transformer_submodules": 1,
        "num_attention_heads": getattr(mc, "num_attention_heads", None),
        "num_layers": getattr(mc, "num_hidden_layers", None),
        # the weights carry everything: how they were initialised does not matter to a loader
        "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None, "prompt_tuning_init_state_dict_path": None, "prompt_tuning_init_task": 0,
        "num_ranks": stack.rank, "num_tasks": len(names), "modules_to_save": None,
    }
    with torch.no_grad():
        tensors = {"prompt_embeddings": stack.shared.detach().clone(),
                   "prefix_task_cols": torch.stack([stack.experts[j].u.detach() for j in js]),
                   "prefix_task_rows": torch.stack([stack.experts[j].v.detach() for j in js])}
    try:
        _write_dir(out, config, tensors)
    except OSError as e:
        raise MtpeftError(f"cannot write the adapter to {out} ({e.strerror or e}); give a directory you can write "
                          "to") from None
    return names


def _shapes_from_peft(bank, config: dict, tensors: dict, d: Path) -> tuple[int, int, int]:
    """``(tasks, n_tokens, rank)`` of a peft MPT adapter, every tensor's shape checked against the backbone."""
    want = {"prompt_embeddings", "prefix_task_cols", "prefix_task_rows"}
    if set(tensors) != want:
        raise MtpeftError(f"{d}: a multitask prompt tuning adapter holds {sorted(want)}; found {sorted(tensors)}")
    if config.get("num_transformer_submodules") not in (None, 1):
        raise MtpeftError(f"{d}: the prompt has {config['num_transformer_submodules']} transformer submodules (an "
                          "encoder-decoder prompt); a bank's backbones are encoder-only or decoder-only")
    P, cols, rows = (tensors[k] for k in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows"))
    hidden = bank.model.get_input_embeddings().weight.shape[1]
    if P.dim() != 2 or P.shape[1] != hidden:
        raise MtpeftError(f"{d}: prompt_embeddings has shape {tuple(P.shape)}; this backbone takes [n, {hidden}]")
    n = P.shape[0]
    if cols.dim() != 3 or rows.dim() != 3 or cols.shape[0] != rows.shape[0] or cols.shape[1] != n \
            or rows.shape[2] != hidden or cols.shape[2] != rows.shape[1]:
        raise MtpeftError(f"{d}: prefix_task_cols {tuple(cols.shape)} and prefix_task_rows {tuple(rows.shape)} are not "
                          f"[tasks, {n}, r] and [tasks, r, {hidden}]")
    return cols.shape[0], n, cols.shape[2]


def import_peft_mpt(bank, adapter_dir: str | Path, names: list[str], *, shared: str = "peft",
                    tasks: list[str] | None = None) -> list[str]:
    """Add a peft multitask prompt tuning adapter to ``bank``: task id ``t`` becomes MPT module ``names[t]``
    (task ``tasks[t]``), all in one new group whose shared prompt, named ``shared``, is the adapter's."""
    d = Path(adapter_dir)
    config, tensors = read_adapter(d)
    if config.get("peft_type") != "MULTITASK_PROMPT_TUNING":
        raise MtpeftError(f"{d}: peft_type {config.get('peft_type')!r} is not MULTITASK_PROMPT_TUNING; import other "
                          "adapters with mtpeft.interop.import_peft")
    T, n, r = _shapes_from_peft(bank, config, tensors, d)
    names = list(names)
    if len(names) != T or len(set(names)) != T:
        raise MtpeftError(f"{d}: the adapter holds {T} tasks; give {T} distinct module names (got {names})")
    tasks = list(tasks) if tasks is not None else [None] * T
    if len(tasks) != T:
        raise MtpeftError(f"{d}: give one task per module ({T}), got {len(tasks)}")
    cfg = MPTConfig(n_tokens=n, rank=r, shared=shared)
    from ..bank.sites import group_key

    if group_key("mpt", cfg) in bank.groups:
        raise MtpeftError(f"the bank already has an MPT group with shared prompt {shared!r} (n_tokens {n}, rank {r}); "
                          "import under another shared name (shared=...), the adapter brings its own shared prompt")
    meta = {"imported_from": {"format": "peft", "path": str(d.resolve()), "peft_type": "MULTITASK_PROMPT_TUNING"}}
    added: list[str] = []
    try:
        for t, (name, task) in enumerate(zip(names, tasks)):
            bank.add_from(name, "mpt", cfg, {"<input>.u": tensors["prefix_task_cols"][t],
                                             "<input>.v": tensors["prefix_task_rows"][t]},
                          task=task, metadata={**meta, "peft_task_id": t}, what=f"{d}: task {t}")
            added.append(name)
        with torch.no_grad():
            shared_prompt(bank, names[0]).copy_(tensors["prompt_embeddings"])
        bank.input_stacks[bank.group_of(names[0]).key].invalidate()
    except BaseException:
        for name in reversed(added):
            bank.remove(name)
        raise
    return names
