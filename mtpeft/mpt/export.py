"""MPT modules out to peft's multitask prompt tuning format (``MULTITASK_PROMPT_TUNING``).

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
from ..interop import TASK_TYPES, _check_target_dir, _write_dir, base_model_name_or_path
from ..modules.mpt import MultitaskPromptTuning


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
