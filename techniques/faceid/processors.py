"""The attention-processor group of FaceID-family checkpoints (``ip_adapter`` / ``adapter_modules``).

The group is the state dict of ``ModuleList(unet.attn_processors.values())``: keys ``"{index}.{param}"`` where the
index is the diffusers processor order (down blocks, up blocks, mid block; even = attn1, odd = attn2). Every index
has a rank-r LoRA on ``to_q``/``to_k``/``to_v``/``to_out`` (``{target}_lora.down.weight`` [r, in] and
``.up.weight`` [out, r], scale 1); odd indices also carry ``to_k_ip``/``to_v_ip`` [C, context] for the decoupled
ID branch. (FaceID-Portrait files have only the IP weights.)

:func:`parse_adapter` validates the whole group, key for key and shape for shape, and reports every problem
at once, naming the keys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ...errors import CheckpointLayoutError

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")
_LORA_KEY = re.compile(r"^(\d+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_IP_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")
MAX_LISTED_PROBLEMS = 12


@dataclass
class ProcessorWeights:
    """One diffusers attention processor's weights. ``lora[target] = (down [r,in], up [out,r])``."""
    index: int
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    to_k_ip: torch.Tensor | None = None
    to_v_ip: torch.Tensor | None = None

    @property
    def is_cross_attention(self) -> bool:
        return self.index % 2 == 1

    @property
    def site_order(self) -> int:
        """k: position of this processor's transformer block in diffusers order (processor 2k / 2k+1)."""
        return self.index // 2


@dataclass
class AdapterWeights:
    """All processors of one checkpoint, validated. ``processors[i].index == i``."""
    processors: list[ProcessorWeights]
    rank: int                    # 0 when the file has no LoRA (FaceID-Portrait)
    context_dim: int

    @property
    def has_lora(self) -> bool:
        return self.rank > 0

    @property
    def num_transformer_blocks(self) -> int:
        return len(self.processors) // 2

    def ip_processors(self) -> list[ProcessorWeights]:
        return [p for p in self.processors if p.is_cross_attention]

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "AdapterWeights":
        """Copy with every tensor moved/cast (the originals are left alone)."""
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)
        return AdapterWeights(
            [ProcessorWeights(p.index, {k: (move(d), move(u)) for k, (d, u) in p.lora.items()},
                              move(p.to_k_ip), move(p.to_v_ip)) for p in self.processors],
            self.rank, self.context_dim)


def raise_problems(problems: list[str], what: str) -> None:
    """One CheckpointLayoutError listing the first problems (every key named) and how many more there are."""
    if not problems:
        return
    listed = "\n  - ".join(problems[:MAX_LISTED_PROBLEMS])
    more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
    raise CheckpointLayoutError(f"{what} does not match the expected layout ({len(problems)} problem(s)):\n  - "
                                f"{listed}{more}")


def parse_adapter(sd: dict[str, torch.Tensor], group: str = "ip_adapter") -> AdapterWeights:
    """Validate and structure a processor group (every key consumed; raises CheckpointLayoutError)."""
    problems: list[str] = []
    by_index, raw_lora = _sort_keys(sd, group, problems)
    if not by_index:
        raise_problems(problems or [f"'{group}' is empty"], f"attention-processor group '{group}'")
    has_lora = bool(raw_lora)
    count = max(by_index) + 1
    count += count % 2                      # processors come in attn1/attn2 pairs
    rank, context_dim = _common_widths(by_index, raw_lora, problems)
    processors = []
    for index in range(count):
        proc = by_index.get(index, ProcessorWeights(index))
        processors.append(proc)
        if has_lora:
            _check_lora(proc, raw_lora.get(index, {}), rank, context_dim, group, problems)
        _check_ip(proc, context_dim, group, problems)
    if not has_lora and not any(p.is_cross_attention for p in by_index.values()):
        problems.append(f"'{group}' has neither LoRA nor IP weights")
    raise_problems(problems, f"attention-processor group '{group}'")
    return AdapterWeights(processors, rank, context_dim)


def _sort_keys(sd: dict[str, torch.Tensor], group: str, problems: list[str]
               ) -> tuple[dict[int, ProcessorWeights], dict[int, dict[tuple[str, str], torch.Tensor]]]:
    """Processors by index (IP weights set) and their raw LoRA tensors by (target, kind); other keys are problems."""
    by_index: dict[int, ProcessorWeights] = {}
    raw_lora: dict[int, dict[tuple[str, str], torch.Tensor]] = {}
    for key, tensor in sd.items():
        m = _LORA_KEY.match(key)
        if m:
            raw_lora.setdefault(int(m[1]), {})[(m[2], m[3])] = tensor
            by_index.setdefault(int(m[1]), ProcessorWeights(int(m[1])))
            continue
        m = _IP_KEY.match(key)
        if m:
            proc = by_index.setdefault(int(m[1]), ProcessorWeights(int(m[1])))
            setattr(proc, m[2], tensor)
            continue
        problems.append(f"unexpected key '{group}.{key}'")
    return by_index, raw_lora


def _common_widths(by_index: dict[int, ProcessorWeights], raw_lora: dict[int, dict[tuple[str, str], torch.Tensor]],
                   problems: list[str]) -> tuple[int, int]:
    """(LoRA rank, IP context width) shared by every processor; the smallest when they differ (a problem)."""
    ranks = {t.shape[0] for parts in raw_lora.values() for (_, kind), t in parts.items() if kind == "down"}
    rank = min(ranks) if ranks else 0
    if len(ranks) > 1:
        problems.append(f"LoRA ranks differ between processors: {sorted(ranks)}")
    contexts = {t.shape[1] for p in by_index.values() for t in (p.to_k_ip, p.to_v_ip) if t is not None and t.dim() == 2}
    context_dim = min(contexts) if contexts else 0
    if len(contexts) > 1:
        problems.append(f"to_k_ip/to_v_ip context widths differ: {sorted(contexts)}")
    return rank, context_dim


def _check_ip(proc: ProcessorWeights, context_dim: int, group: str, problems: list[str]) -> None:
    """Cross-attention processors have to_k_ip/to_v_ip [hidden, context]; self-attention ones have none.

    Runs after _check_lora: the hidden width comes from the processor's validated to_q LoRA when it has one."""
    cross = proc.is_cross_attention
    hidden = _hidden_size(proc)
    for name in ("to_k_ip", "to_v_ip"):
        tensor = getattr(proc, name)
        key = f"{group}.{proc.index}.{name}.weight"
        if cross and tensor is None:
            problems.append(f"missing key '{key}'")
        elif not cross and tensor is not None:
            problems.append(f"unexpected key '{key}' (even indices are self-attention, which has no IP branch)")
        elif tensor is not None and (tensor.dim() != 2 or (hidden and tensor.shape[0] != hidden)
                                     or tensor.shape[1] != context_dim):
            problems.append(f"mis-shaped key '{key}': {list(tensor.shape)}, expected [{hidden or 'C'}, "
                            f"{context_dim}]")


def _hidden_size(proc: ProcessorWeights) -> int:
    if "to_q" in proc.lora:
        return proc.lora["to_q"][1].shape[0]
    if proc.to_k_ip is not None and proc.to_k_ip.dim() == 2:
        return proc.to_k_ip.shape[0]
    return 0


def _check_lora(proc: ProcessorWeights, parts: dict[tuple[str, str], torch.Tensor], rank: int, context_dim: int,
                group: str, problems: list[str]) -> None:
    """Every target has down [r, in] and up [out, r]; in/out follow from the block width and the context."""
    hidden = parts[("to_q", "up")].shape[0] if ("to_q", "up") in parts and parts[("to_q", "up")].dim() == 2 else None
    for target in LORA_TARGETS:
        text_input = proc.is_cross_attention and target in ("to_k", "to_v")
        in_dim = (context_dim or None) if text_input else hidden
        expected = {"down": [rank, in_dim], "up": [hidden, rank]}
        tensors = {}
        for kind in ("down", "up"):
            key = f"{group}.{proc.index}.{target}_lora.{kind}.weight"
            tensor = parts.get((target, kind))
            if tensor is None:
                problems.append(f"missing key '{key}'")
                continue
            want = expected[kind]
            if tensor.dim() != 2 or any(w is not None and s != w for s, w in zip(tensor.shape, want, strict=True)):
                problems.append(f"mis-shaped key '{key}': {list(tensor.shape)}, expected "
                                f"{[w if w is not None else '?' for w in want]}")
                continue
            tensors[kind] = tensor
        if len(tensors) == 2:
            proc.lora[target] = (tensors["down"], tensors["up"])
