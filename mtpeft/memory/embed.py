"""Memory keys: the frozen backbone's mean-pooled, L2-normalised embeddings of texts."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def embed_texts(bank, texts: Sequence[str], batch_size: int = 64, max_length: int = 128) -> Tensor:
    """``[len(texts), H]`` float32 on the CPU: ``bank.pooled`` (the bare backbone, no module acting) of each
    batch of ``texts``, tokenised with the backbone's tokenizer."""
    tok = bank.backbone.tokenizer
    out = [torch.empty(0, bank.backbone.hidden_size)]
    for i in range(0, len(texts), batch_size):
        enc = tok(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        out.append(bank.pooled(enc["input_ids"].to(bank.device), enc["attention_mask"].to(bank.device))
                   .float().cpu())
    return torch.cat(out)
